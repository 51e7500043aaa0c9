"""Shared fixtures.

Server-backed tests (PostgreSQL, Redis) skip with a reason when the server is unreachable, so the
suite runs anywhere; with LOWBIT_REQUIRE_SERVICES=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

# The test process's own ONNX Runtime (model builders, reference runs) sends no telemetry either, as lowbit's
# processes do not: it writes $TMPDIR/.ses, which tests that watch the temp folder would see.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from tests import builders  # noqa: E402

POSTGRES_URL = os.environ.get("LOWBIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("LOWBIT_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REQUIRE = os.environ.get("LOWBIT_REQUIRE_SERVICES", "") not in ("", "0", "false")


@pytest.fixture(autouse=True, scope="session")
def _reports_checked_by_the_typed_model_too() -> Iterator[None]:
    """The engine checks each report against the contract's committed schema (worker/engine/report_check.py); in
    tests every report it checks also goes through the typed model, which must accept it as well."""
    from worker.engine import report_check
    from worker.engine.report import validate_report

    light = report_check.check

    def both(report: dict[str, Any]) -> dict[str, Any]:
        light(report)
        return validate_report(report)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_check, "check", both)
        yield


def _reachable(url: str, default_port: int) -> str | None:
    u = urlparse(url.replace("postgresql+psycopg", "postgresql"))
    host, port = u.hostname or "127.0.0.1", u.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc})"


def _unavailable(what: str, why: str) -> None:
    msg = f"{what} server not available: {why}"
    if REQUIRE:
        pytest.fail(msg + " (LOWBIT_REQUIRE_SERVICES is set, so this is an error)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the PostgreSQL server, dropped at the end of the session."""
    why = _reachable(POSTGRES_URL, 5432)
    if why:
        _unavailable("PostgreSQL", why)
    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"lowbit_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # reachable port but unusable server
        admin.dispose()
        _unavailable("PostgreSQL", repr(exc))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database number of its own for this run (flushed first)."""
    why = _reachable(REDIS_URL, 6379)
    if why:
        _unavailable("Redis", why)
    import redis

    url = REDIS_URL.rstrip("/") + "/11"
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except Exception as exc:
        _unavailable("Redis", repr(exc))
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small models and datasets, built once per session."""
    d = tmp_path_factory.mktemp("zoo")
    z: dict[str, Path] = {}
    z["conv"] = builders.conv_net(d / "conv.onnx")
    z["conv_data"] = builders.image_data(d / "conv_data.npz", n=48, labels=True, model=z["conv"])
    z["conv_eval"] = builders.image_data(d / "conv_eval.npz", n=24, seed=5, labels=True, model=z["conv"])
    z["mlp"] = builders.mlp(d / "mlp.onnx")
    z["mlp_data"] = builders.mlp_data(d / "mlp_data.npz", n=80, labels=True, model=z["mlp"])
    z["tf"] = builders.tiny_transformer(d / "tf.onnx")
    z["tf_data"] = builders.token_data(d / "tf_data.npz", n=24)
    z["const"] = builders.constant_weights_opset11(d / "const.onnx")
    import numpy as np

    rng = np.random.default_rng(3)
    z["const_data"] = builders.save_npz(d / "const_data.npz", x=rng.standard_normal((40, 16)).astype(np.float32))
    return z


@pytest.fixture(scope="session")
def pt2_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """torch.export archives (.pt2) and datasets labelled by the float models themselves, built once."""
    import numpy as np

    from tests import pt2_builders as pb

    d = tmp_path_factory.mktemp("pt2")
    rng = np.random.default_rng(1)
    z: dict[str, Path] = {}
    z["conv"] = pb.conv_net(d / "conv.pt2")
    z["conv_data"] = pb.labelled(z["conv"], d / "conv_data.npz",
                                 {"image": rng.standard_normal((40, 3, 32, 32)).astype(np.float32)})
    z["tf"] = pb.transformer_block(d / "tf.pt2")
    ids = rng.integers(0, 500, (40, 16)).astype(np.int64)
    mask = np.ones((40, 16), np.int64)
    mask[:, 12:] = rng.integers(0, 2, (40, 4))
    z["tf_data"] = pb.labelled(z["tf"], d / "tf_data.npz", {"input_ids": ids, "attention_mask": mask})
    z["outlier"] = pb.outlier_mlp(d / "outlier.pt2")
    z["outlier_cal"] = pb.labelled(z["outlier"], d / "outlier_cal.npz",
                                   {"features": rng.standard_normal((256, 32)).astype(np.float32)})
    z["outlier_eval"] = pb.labelled(z["outlier"], d / "outlier_eval.npz",
                                    {"features": rng.standard_normal((512, 32)).astype(np.float32)})
    return z


# Where the browser tests saved their screenshots (set by tests/e2e/test_browser.py), for the summary.
SCREENSHOTS = pytest.StashKey[Path]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name every skipped test, so a run without PostgreSQL or Redis says exactly what it did not run; say where
    the browser tests' screenshots are."""
    shots = terminalreporter.config.stash.get(SCREENSHOTS, None)
    if shots is not None:
        terminalreporter.section("screenshots")
        terminalreporter.line(f"page screenshots saved in {shots}")
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} test(s) skipped")
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        terminalreporter.line(f"{rep.nodeid}: {reason.removeprefix('Skipped: ')}")
