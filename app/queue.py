"""Hands job ids to the broker. Only ids travel; the worker reads everything else from the database.

The database row is the truth and a message is only a wake-up call, so a queued job whose message is gone
(the API died between its commit and the publish, or the broker lost its data in a restart) is published
again by ``reconcile``, which workers run from their sweeper thread and ``lowbit serve`` runs at start.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.broker import TASK_RUN_JOB, make_celery
from app.db import utcnow
from app.jobs import lifecycle
from app.jobs.models import QUEUED, Job
from app.settings import Settings

log = logging.getLogger(__name__)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# kombu's Redis transport: a queue with priorities is several lists, "<queue>" and "<queue>\x06\x16<step>";
# messages delivered but not yet acknowledged wait in the "unacked" hash.
_REDIS_PRIORITY_SEP = "\x06\x16"
_REDIS_PRIORITY_STEPS = (3, 6, 9)
_REDIS_UNACKED = "unacked"


class JobQueue(Protocol):
    def enqueue(self, job_id: str, queue: str) -> None: ...

    def ping(self) -> None: ...


class CeleryQueue:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)

    def enqueue(self, job_id: str, queue: str) -> None:
        self.celery.send_task(TASK_RUN_JOB, args=[job_id], queue=queue, retry=True,
                              retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})

    def ping(self) -> None:
        if self.settings.uses_filesystem_broker:
            folder = self.settings.broker_dir / "queue"
            if not folder.is_dir():
                raise RuntimeError(f"broker folder {folder} is missing")
            return
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def held_job_ids(self, queues: set[str]) -> set[str] | None:
        """The job ids that broker messages carry now, waiting in ``queues`` or delivered and not yet
        acknowledged; None when this broker cannot be inspected."""
        url = self.settings.resolved_broker_url
        if self.settings.uses_filesystem_broker:
            return _filesystem_held(self.settings.broker_dir / "queue")
        if url.startswith(("redis://", "rediss://")):
            return _redis_held(url, queues)
        return None


def _job_ids(raw: bytes | str) -> set[str]:
    """The job id(s) in one serialized kombu message (its body is base64 JSON: [args, kwargs, embed])."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # an "unacked" entry: [message, exchange, routing_key]
            message = message[0]
        body = message.get("body", "")
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode("utf-8", "replace")
        args = json.loads(body)[0]
        return {a for a in args if isinstance(a, str) and _UUID.fullmatch(a)}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        return set(_UUID.findall(text))  # an unexpected layout: any id it mentions counts as held


def _filesystem_held(folder: Path) -> set[str]:
    held: set[str] = set()
    for path in folder.glob("*.msg"):
        try:
            held |= _job_ids(path.read_bytes())
        except OSError:  # consumed while we looked: the worker holds it now
            continue
    return held


def _redis_held(url: str, queues: set[str]) -> set[str]:
    # lazy: the Redis client (~0.2 s) is needed only with a Redis broker, not with the filesystem one
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        lists = [q + suffix for q in queues
                 for suffix in ("", *(f"{_REDIS_PRIORITY_SEP}{p}" for p in _REDIS_PRIORITY_STEPS))]
        held: set[str] = set()
        # The queue lists, then the unacked hash, then the lists again: a message moving from a list to the
        # hash while we read is seen in one of them.
        for raw in [m for name in lists for m in client.lrange(name, 0, -1)]:
            held |= _job_ids(raw)
        for raw in client.hvals(_REDIS_UNACKED):
            held |= _job_ids(raw)
        for raw in [m for name in lists for m in client.lrange(name, 0, -1)]:
            held |= _job_ids(raw)
        return held
    finally:
        client.close()


def reconcile(factory: sessionmaker[Session], queue: CeleryQueue, after_s: float) -> list[str]:
    """Publish the queued jobs that no broker message carries and that have waited ``after_s`` seconds
    since they were committed or last published. Safe from several processes at once: each job's
    ``enqueued_at`` is moved with a conditional UPDATE first, and only the winner publishes. Returns the
    ids published."""
    cutoff = utcnow() - timedelta(seconds=after_s)
    with factory() as s:
        waiting = s.execute(
            sa.select(Job.id, Job.queue, Job.enqueued_at).where(
                Job.status == QUEUED, Job.cancel_requested.is_(False),
                sa.or_(Job.enqueued_at < cutoff, sa.and_(Job.enqueued_at.is_(None), Job.created_at < cutoff)))
        ).all()
    if not waiting:
        return []
    held = queue.held_job_ids({q for _, q, _ in waiting})
    if held is None:
        return []
    published: list[str] = []
    for job_id, queue_name, seen in waiting:
        if job_id in held:
            continue
        with factory.begin() as s:
            moved = lifecycle.republish(s, job_id, seen)
        if moved is not lifecycle.Transition.APPLIED:
            continue  # claimed, cancelled or published by someone else meanwhile
        queue.enqueue(job_id, queue_name)
        published.append(job_id)
        log.warning("job %s was queued but no broker message carried it (%s); published it again", job_id,
                    "never published" if seen is None else "the broker lost it")
    return published


def mark_published(db: Session, job_id: str) -> None:
    """Record that the broker has the job's message (a short transaction of its own, after the publish):
    a queued job without it is one whose API died before publishing, which ``reconcile`` then publishes."""
    lifecycle.mark_published(db, job_id)
    db.commit()
