"""The production topology without Docker: `lowbit migrate`, `lowbit serve --no-worker` and a separate
`lowbit worker` process, on PostgreSQL and Redis (the commands docker-compose.yml runs)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.e2e.conftest import Proc, env_for, lowbit_cmd, start_serve
from tests.e2e.flows import check_against_report, one_shot, run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    data = tmp_path_factory.mktemp("prod-data")
    env = env_for(data, LOWBIT_DATABASE_URL=postgres_url, LOWBIT_BROKER_URL=redis_url)
    # Other modules may have migrated this database already; migrating again must be a no-op.
    subprocess.run(lowbit_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)
    worker = Proc(lowbit_cmd("worker", "--queues", "cpu", "--concurrency", "1"), env, data / "worker.log")
    try:
        api, client = start_serve(data, data / "api.log", "--host", "127.0.0.1", "--no-worker", "--no-migrate",
                                  env=env)
    except BaseException:
        worker.stop()
        raise
    try:
        yield client, worker, postgres_url, tmp_path_factory.mktemp("prod-out")
    finally:
        client.close()
        api.stop()
        worker.stop()


@pytest.mark.parametrize("recipe", ["int8_static", "int8_dynamic"])
def test_conv_net(stack: tuple, big: dict[str, Path], recipe: str) -> None:
    client, worker, _, out = stack
    report, artifact = run_job(client, worker, big["conv"], big["conv_data"], recipe, out, batch_size=4)
    assert report["size"]["ratio"] <= 0.35
    assert report["accuracy"]["outputs"][0]["cosine"] > 0.99
    assert report["accuracy"]["labels"] is not None
    check_against_report(big["conv"], artifact, big["conv_data"], report, batch=4)


@pytest.mark.parametrize("recipe", ["int8_static", "int8_dynamic"])
def test_20mb_transformer_with_int64_inputs(stack: tuple, big: dict[str, Path], recipe: str) -> None:
    client, worker, _, out = stack
    report, artifact = run_job(client, worker, big["tf"], big["tf_data"], recipe, out, batch_size=4)
    assert report["size"]["original_bytes"] > 20 * 1024 * 1024
    assert report["size"]["ratio"] <= 0.35
    assert report["accuracy"]["outputs"][0]["cosine"] > 0.98
    check_against_report(big["tf"], artifact, big["tf_data"], report, batch=4)


def test_duplicate_delivery_runs_the_job_once(stack: tuple, big: dict[str, Path]) -> None:
    from app.broker import TASK_RUN_JOB, make_celery
    from app.settings import Settings

    client, worker, db_url, _ = stack
    job = one_shot(client, worker, big["conv"], big["conv_data"], {"recipe": "int8_dynamic"})
    assert job["status"] == "succeeded"
    # Deliver the same job id again, twice, straight through Redis.
    settings = Settings(broker_url=worker.env["LOWBIT_BROKER_URL"])
    celery = make_celery(settings)
    for _ in range(2):
        celery.send_task(TASK_RUN_JOB, args=[job["id"]], queue="cpu")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and worker.tail(100_000).count(job["id"]) < 3:
        time.sleep(0.2)
    assert worker.tail(100_000).count("nothing to do") >= 2, worker.tail()
    engine = sa.create_engine(db_url)
    with engine.connect() as c:
        attempts, status = c.execute(sa.text("SELECT attempts, status FROM jobs WHERE id = :i"),
                                     {"i": job["id"]}).one()
    engine.dispose()
    assert (attempts, status) == (1, "succeeded")
    assert client.get(f"/api/v1/jobs/{job['id']}").json()["finished_at"] == job["finished_at"]
