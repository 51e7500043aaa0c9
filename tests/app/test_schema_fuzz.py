"""Schemathesis against the app's own OpenAPI schema, in process (ASGI transport), on SQLite and PostgreSQL:
generated requests to every operation, valid and invalid, get no 5xx, and every response conforms to what
the schema documents (status code, content type, body schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.app.conftest import Harness
from tests.app.helpers import submit, upload_dataset, upload_model

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# /readyz answers 503 by design while jobs wait on a queue no live worker consumes (this harness queues a job
# and runs no worker): that answer is documented, so status_code_conformance still checks it.
READINESS_CHECKS = [c for c in CHECKS if c is not not_a_server_error]
# Small and bounded: a few dozen operations x this many examples stay well under a minute.
EXAMPLES = 20


def _operations(schema: Any) -> list[Any]:
    ops = []
    for result in schema.get_all_operations():
        op = result.ok()
        # The event stream stays open while a job runs; the fuzzer's ids never name one, but a generated id of
        # a real job would make it wait for the job's end.
        if not op.path.endswith("/events"):
            ops.append(op)
    return ops


def test_fuzz_every_operation(api: Harness, zoo: dict[str, Path]) -> None:
    # Something to find: a model, a dataset and a job, so list and lookup operations return real rows too.
    m = upload_model(api.client, zoo["mlp"])
    d = upload_dataset(api.client, zoo["mlp_data"])
    r = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_dynamic")
    assert r.status_code == 202, r.text
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app)
    ops = _operations(schema)
    assert {"/api/v1/models", "/api/v1/datasets", "/api/v1/jobs", "/api/v1/jobs/{job_id}"} <= {o.path for o in ops}
    failures: list[str] = []
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(checks=READINESS_CHECKS if case.operation.path == "/readyz" else CHECKS)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, not only the first
            failures.append(f"{op.method.upper()} {op.path}: {str(exc)[:1500]}")
    assert failures == [], "\n\n".join(failures)


@pytest.mark.parametrize("path", ["/openapi.json"])
def test_schema_documents_the_error_shape(api: Harness, path: str) -> None:
    spec = api.client.get(path).json()
    upload = spec["paths"]["/api/v1/models"]["post"]["responses"]
    assert {"201", "413", "422"} <= set(upload)
    assert "ErrorOut" in str(upload["413"])
