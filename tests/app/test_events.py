"""GET /api/v1/jobs/{id}/events (server-sent events), and the OpenAPI document's examples."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from app.jobs import events
from tests.app.conftest import Harness
from tests.app.helpers import error_of, submit, upload_dataset, upload_model

STAGES = ["preparing", "calibrating", "quantizing", "validating", "reporting"]


def parse(text: str) -> list[tuple[str, Any]]:
    """(event, data) pairs of an event stream; comments kept as ('comment', text)."""
    out: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                out.append(("comment", line[1:].strip()))
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith("retry: "):
                out.append(("retry", int(line[7:])))
        if data:
            out.append((name, json.loads("\n".join(data))))
    return out


def test_events_of_a_finished_job(api: Harness, zoo: dict[str, Path]) -> None:
    m = upload_model(api.client, zoo["conv"])
    d = upload_dataset(api.client, zoo["conv_data"])
    job = submit(api.client, model_id=m["id"], calibration_dataset_id=d["id"], recipe="int8_static",
                 options={"batch_size": 4}).json()
    assert api.run_queued() == ["succeeded"]

    r = api.client.get(f"/api/v1/jobs/{job['id']}/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    got = parse(r.text)
    assert got[0] == ("retry", 2000)
    # Connected after the job finished: every stage it went through, in order, then the final job; nothing after.
    assert [d["stage"] for e, d in got if e == "stage"] == STAGES
    stages = [d for e, d in got if e == "stage"]
    for a, b in zip(stages, stages[1:], strict=False):
        assert a["started_at"] <= a["finished_at"] == b["started_at"]
    assert got[-1][0] == "end" and [e for e, _ in got].count("end") == 1
    assert got[-1][1] == api.client.get(f"/api/v1/jobs/{job['id']}").json()
    assert got[-1][1]["status"] == "succeeded"

    r = api.client.get("/api/v1/jobs/00000000-0000-0000-0000-000000000000/events")
    assert r.status_code == 404 and error_of(r) == "job_not_found"


class _Request:
    def __init__(self) -> None:
        self.checks = 0

    async def is_disconnected(self) -> bool:
        self.checks += 1
        return self.checks > 40


def test_stream_sends_changes_then_keep_alives_and_stops_when_the_client_goes() -> None:
    running = {"id": "j", "status": "running", "stage": "calibrating", "progress": 20}
    snaps = iter([events.Snapshot(running, [{"stage": "preparing"}, {"stage": "calibrating"}])]
                 + [events.Snapshot({**running, "progress": 30}, [{"stage": "preparing"}, {"stage": "calibrating"}])]
                 * 100)
    first = events.Snapshot({**running, "stage": "preparing", "progress": 5}, [{"stage": "preparing"}])

    async def collect() -> list[str]:
        from unittest import mock

        with mock.patch.object(events, "read", lambda *_: next(snaps)):
            return [c async for c in events.stream(_Request(), None, "j", first,  # type: ignore[arg-type]
                                                   poll_s=0.005, heartbeat_s=0.05)]

    got = parse("".join(asyncio.run(collect())))
    kinds = [e for e, _ in got]
    assert kinds[:5] == ["retry", "stage", "job", "stage", "job"]
    assert [d["progress"] for e, d in got if e == "job"] == [5, 20, 30]  # a change each, no repeats
    assert "comment" in kinds[5:] and set(kinds[5:]) <= {"comment", "job"}
    assert all(d == "keep-alive" for e, d in got if e == "comment")


def test_openapi_has_an_example_for_every_request_and_response(api: Harness) -> None:
    doc = api.client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        return schemas[ref.rsplit("/", 1)[1]] if ref else schema

    def has_example(media: dict[str, Any]) -> bool:
        schema = resolve(media.get("schema", {}))
        if schema.get("type") == "array":
            schema = resolve(schema.get("items", {}))
        return bool(media.get("example") or media.get("examples") or schema.get("examples"))

    missing = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for ctype, media in op.get("requestBody", {}).get("content", {}).items():
                if not has_example(media):
                    missing.append(f"{method} {path} request {ctype}")
            for param in op.get("parameters", []):
                if param["in"] == "query" and param.get("required") and not param["schema"].get("examples"):
                    missing.append(f"{method} {path} parameter {param['name']}")
            for status, resp in op["responses"].items():
                for ctype, media in resp.get("content", {}).items():
                    if not has_example(media):
                        missing.append(f"{method} {path} {status} {ctype}")
    assert missing == []
    # Every named schema carries its own example, except FastAPI's multipart form bodies (their operations
    # carry one instead) and the report's model and its sections: GET /api/v1/jobs/{id}/report carries one
    # whole report as its example (app.examples.REPORT_EXAMPLE, which tests/app/test_report_contract.py
    # validates against that model), which shows every section in place.
    def refs(node: Any) -> set[str]:
        if isinstance(node, dict):
            found = {node["$ref"].rsplit("/", 1)[1]} if isinstance(node.get("$ref"), str) else set()
            return found.union(*(refs(v) for v in node.values()))
        if isinstance(node, list):
            return set().union(*(refs(v) for v in node))
        return set()

    report_parts, todo = {"Report"}, ["Report"]
    while todo:
        for name in refs(schemas[todo.pop()]) - report_parts:
            report_parts.add(name)
            todo.append(name)
    report_op = doc["paths"]["/api/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]["content"]
    assert report_op["application/json"]["example"]["report_version"] == 1
    assert [n for n, s in schemas.items()
            if "examples" not in s and not n.startswith("Body_") and n not in report_parts] == []
    assert {"/api/v1/jobs/{job_id}/events", "/metrics", "/api/v1/models", "/api/v1/datasets"} <= set(doc["paths"])
    assert "HTTPValidationError" not in schemas  # errors are documented as they are: {"error": {code, message}}
    assert api.client.get("/docs").status_code == 200
