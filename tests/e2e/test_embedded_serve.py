"""The README's embedded mode: one `lowbit serve` process (SQLite, filesystem broker, one worker
process), nothing else installed or started."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import start_serve, wait_job
from tests.e2e.flows import check_against_report, run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    data = tmp_path_factory.mktemp("embedded") / "lowbit-data"
    proc, client = start_serve(data, data.parent / "serve.log")
    try:
        yield client, proc, data, tmp_path_factory.mktemp("embedded-out")
    finally:
        client.close()
        proc.stop()


def test_embedded_mode_keeps_everything_in_the_data_dir(served: tuple) -> None:
    _, _, data, _ = served
    assert (data / "lowbit.db").is_file()
    assert (data / "broker").is_dir()


@pytest.mark.parametrize("recipe", ["int8_static", "int8_dynamic"])
def test_conv_net(served: tuple, big: dict[str, Path], recipe: str) -> None:
    client, proc, _, out = served
    report, artifact = run_job(client, proc, big["conv"], big["conv_data"], recipe, out, batch_size=4)
    assert report["size"]["ratio"] <= 0.35
    check_against_report(big["conv"], artifact, big["conv_data"], report, batch=4)


@pytest.mark.parametrize("recipe", ["int8_static", "int8_dynamic"])
def test_20mb_transformer_with_int64_inputs(served: tuple, big: dict[str, Path], recipe: str) -> None:
    client, proc, _, out = served
    report, artifact = run_job(client, proc, big["tf"], big["tf_data"], recipe, out, batch_size=4)
    assert report["size"]["original_bytes"] > 20 * 1024 * 1024
    assert report["size"]["ratio"] <= 0.35
    check_against_report(big["tf"], artifact, big["tf_data"], report, batch=4)


def test_progress_is_visible_while_running_and_cancel_stops_a_job(served: tuple, big: dict[str, Path]) -> None:
    client, proc, _, _ = served
    # Many latency runs keep the job in 'validating' long enough to watch it and cancel it there.
    files = {"model": ("t.onnx", big["tf"].read_bytes()), "calibration": ("d.npz", big["tf_data"].read_bytes())}
    r = client.post("/api/v1/jobs", files=files,
                    data={"config": '{"recipe": "int8_dynamic", "options": {"latency_runs": 1000}}'})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    seen: list[tuple[str, str | None, int]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        j = client.get(f"/api/v1/jobs/{job_id}").json()
        seen.append((j["status"], j["stage"], j["progress"]))
        if j["status"] == "running" and j["stage"] == "validating" and j["progress"] >= 60:
            break
        assert j["status"] in ("queued", "running"), (j, proc.tail())
        time.sleep(0.05)
    running = [s for s in seen if s[0] == "running"]
    assert running and all(s[1] in ("preparing", "quantizing", "validating") for s in running)
    progress = [s[2] for s in running]
    assert progress == sorted(progress) and 60 <= progress[-1] < 100
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
    final = wait_job(client, job_id, proc)
    assert final["status"] == "cancelled"
    assert client.get(f"/api/v1/jobs/{job_id}/artifact").status_code == 409
