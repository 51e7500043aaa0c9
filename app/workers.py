"""Which workers are alive, and on which queues: each worker's main process keeps a row in ``workers`` fresh
(``beat``) and removes it when it stops (``forget``); the API reads the live ones (``live_per_queue``) to say
when jobs wait on a queue that nobody consumes. In the database, so it works the same on SQLite with the
filesystem broker (`lowbit serve`) as on PostgreSQL with Redis."""

from __future__ import annotations

import socket
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow
from app.jobs.models import QUEUED, Job, Worker

# A beat holds for this many intervals: one late beat (a busy machine, a database hiccup) is not a death.
BEATS_PER_LEASE = 3
# Rows of workers that died without removing them are deleted after this long (they are not live long before).
FORGET_AFTER = timedelta(days=1)


def beat(factory: sessionmaker[Session], worker_id: str, queues: list[str], interval_s: float,
         memory_mb: int | None = None) -> None:
    """Insert or refresh this worker's row; it counts as alive for BEATS_PER_LEASE intervals."""
    now = utcnow()
    values = {"queues": ",".join(queues), "heartbeat_at": now, "memory_mb": memory_mb,
              "expires_at": now + timedelta(seconds=BEATS_PER_LEASE * interval_s)}
    with factory.begin() as s:
        res = s.execute(sa.update(Worker).where(Worker.id == worker_id).values(**values))
        if not res.rowcount:  # type: ignore[attr-defined]
            s.add(Worker(id=worker_id, hostname=worker_id.rpartition(":")[0] or socket.gethostname(),
                         started_at=now, **values))
        s.execute(sa.delete(Worker).where(Worker.expires_at < now - FORGET_AFTER))


def forget(factory: sessionmaker[Session], worker_ids: list[str]) -> None:
    """Remove these workers' rows (they stopped, or `lowbit serve` saw them die)."""
    if worker_ids:
        with factory.begin() as s:
            s.execute(sa.delete(Worker).where(Worker.id.in_(worker_ids)))


def live_per_queue(db: Session) -> dict[str, int]:
    """queue -> workers alive now that consume it."""
    counts: dict[str, int] = {}
    for (queues,) in db.execute(sa.select(Worker.queues).where(Worker.expires_at > utcnow())):
        for q in filter(None, queues.split(",")):
            counts[q] = counts.get(q, 0) + 1
    return counts


def machine_memory_mb() -> int | None:
    """This machine's total memory (MemTotal), or None where /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def live_memory(db: Session) -> list[tuple[list[str], int | None]]:
    """(queues, declared memory in MB or None) of every worker alive now."""
    return [([q for q in queues.split(",") if q], mem) for queues, mem in
            db.execute(sa.select(Worker.queues, Worker.memory_mb).where(Worker.expires_at > utcnow()))]


def waiting_per_queue(db: Session) -> dict[str, int]:
    """queue -> queued jobs (not being cancelled)."""
    return {q: n for q, n in db.execute(
        sa.select(Job.queue, sa.func.count()).where(Job.status == QUEUED, Job.cancel_requested.is_(False))
        .group_by(Job.queue))}


def unserved(db: Session) -> dict[str, int]:
    """Queues with jobs waiting and no live worker: queue -> jobs waiting."""
    live = live_per_queue(db)
    return {q: n for q, n in sorted(waiting_per_queue(db).items()) if n and not live.get(q)}


def waiting_reason(queue: str) -> str:
    return (f"waiting for a worker on queue {queue}: no live worker consumes it (start one with "
            f"'lowbit worker --queues {queue}')")


def live_queues(db: Session) -> set[str]:
    """The queues some live worker consumes, read once per database session (a page or a list of jobs asks
    for every job)."""
    cached = db.info.get("lowbit_live_queues")
    if cached is None:
        cached = db.info["lowbit_live_queues"] = set(live_per_queue(db))
    return set(cached)
