"""What the broker holds, and the reconciler that publishes queued jobs no message carries: on the filesystem
broker (embedded mode) and on Redis, with the jobs in the app's database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from app.db import utcnow
from app.jobs.models import Job
from app.queue import CeleryQueue, reconcile
from app.settings import Settings
from tests.app.conftest import Harness
from tests.app.helpers import submit, upload_model


def _age(api: Harness, job_id: str, enqueued: bool) -> None:
    """Make the job look as if it was committed (and, if ``enqueued``, published) a minute ago."""
    old = utcnow() - timedelta(seconds=60)
    with api.factory.begin() as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(created_at=old, enqueued_at=old if enqueued else None))


def test_reconcile_publishes_only_jobs_the_filesystem_broker_lost(api: Harness, zoo: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    m = upload_model(api.client, zoo["mlp"])
    lost, unpublished, fresh = (submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
                                for _ in range(3))
    with api.factory() as s:  # the route records the publish after its commit
        assert all(s.get(Job, j).enqueued_at is not None for j in (lost, unpublished, fresh))  # type: ignore[union-attr]
    broker = CeleryQueue(Settings(data_dir=tmp_path / "data"))
    assert broker.held_job_ids({"cpu"}) == set()
    _age(api, lost, enqueued=True)  # published a minute ago, and the broker has no message: lost
    _age(api, unpublished, enqueued=False)  # committed a minute ago, never published: the API died
    assert sorted(reconcile(api.factory, broker, after_s=10)) == sorted([lost, unpublished])
    assert broker.held_job_ids({"cpu"}) == {lost, unpublished}
    messages = list((tmp_path / "data" / "broker" / "queue").glob("*.msg"))
    assert len(messages) == 2
    # Still held, even when they have waited long: not published twice.
    _age(api, lost, enqueued=True)
    assert reconcile(api.factory, broker, after_s=10) == []
    # A job recently published (fresh) is never touched, nor one that is no longer queued.
    with api.factory.begin() as s:
        s.execute(sa.update(Job).where(Job.id == lost).values(status="cancelled", cancel_requested=True))
    for path in messages:  # the broker loses both messages; only the still-queued job is published again
        path.unlink()
    _age(api, unpublished, enqueued=True)
    assert reconcile(api.factory, broker, after_s=10) == [unpublished]


def test_redis_held_ids_cover_waiting_and_unacked_messages(redis_url: str) -> None:
    import redis

    url = redis_url.rsplit("/", 1)[0] + "/15"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        broker = CeleryQueue(Settings(broker_url=url))
        delivered = "11111111-2222-4333-8444-555555555555"
        waiting = "66666666-7777-4888-9999-aaaaaaaaaaaa"
        broker.enqueue(delivered, "cpu")
        broker.enqueue(waiting, "cpu")
        # What a worker does on delivery: the oldest message leaves the list for the unacked hash until acked.
        raw = client.rpop("cpu")
        assert raw is not None and delivered.encode() in raw
        assert isinstance(raw, bytes | str)
        client.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", "cpu"]))
        assert client.llen("cpu") == 1
        assert broker.held_job_ids({"cpu"}) == {waiting, delivered}
        assert broker.held_job_ids({"gpu"}) == {delivered}  # the unacked hash is shared by every queue
        assert broker.held_job_ids(set()) == {delivered}
    finally:
        client.flushdb()
        client.close()


def test_lowbit_serve_publishes_unpublished_jobs_when_it_starts(api: Harness, zoo: dict[str, Path]) -> None:
    from app.cli import _reconcile_queue

    m = upload_model(api.client, zoo["mlp"])
    job_id = submit(api.client, model_id=m["id"], recipe="int8_dynamic").json()["id"]
    _age(api, job_id, enqueued=False)  # the previous server died between its commit and the publish
    broker = CeleryQueue(api.settings)
    assert job_id not in (broker.held_job_ids({"cpu"}) or set())
    _reconcile_queue(api.settings)
    assert broker.held_job_ids({"cpu"}) == {job_id}
