"""What each worker's main process does in the background for every job, not only its own: queue again the
running jobs whose worker died (their heartbeat went stale), publish again the queued jobs that no broker
message carries (``app/queue.py``'s reconciler), send the webhooks of jobs whose worker died between recording
the end and sending it (``app/webhooks.py``), and apply the retention of finished jobs' files (``app/gc.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app import gc, webhooks
from app.db import utcnow
from app.jobs import lifecycle
from app.jobs.models import CANDIDATE_PENDING, QUEUED, RUNNING, AutoCandidate, Job
from app.queue import CeleryQueue, reconcile
from app.settings import get_settings
from app.storage import Storage
from worker.runner import sessions

log = logging.getLogger(__name__)


def sweep_stale(factory: sessionmaker[Session], lease_s: float, enqueue: Callable[[str, str], Any],
                held: Callable[[set[str]], set[str] | None] | None = None) -> list[str]:
    """Re-queue running jobs whose heartbeat is older than ``lease_s`` (their worker died), or fail them
    after MAX_ATTEMPTS. Safe to run from several workers at once: each change is a conditional UPDATE
    on (status, attempts), and only the one that wins it enqueues. Returns the re-queued job ids.

    An ``auto`` job has no process of its own while its candidates wait for a free worker: it is not
    stale while candidates of its attempt are pending and the broker still carries messages for it
    (``held``: the job ids the broker holds in the given queues, None if it cannot tell)."""
    cutoff = utcnow() - timedelta(seconds=lease_s)
    with factory() as s:
        stale = s.execute(
            sa.select(Job.id, Job.attempts, Job.queue, Job.cancel_requested, Job.recipe)
            .where(Job.status == RUNNING, sa.or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None)))
        ).all()
        waiting = {
            job_id for (job_id,) in s.execute(
                sa.select(AutoCandidate.job_id).join(Job, Job.id == AutoCandidate.job_id)
                .where(AutoCandidate.job_id.in_([row.id for row in stale if row.recipe == "auto"]),
                       AutoCandidate.attempt == Job.attempts, AutoCandidate.status == CANDIDATE_PENDING)
                .distinct())
        } if any(row.recipe == "auto" for row in stale) else set()
    carried = (held({row.queue for row in stale if row.id in waiting}) if held and waiting else None) or set()
    requeued: list[str] = []
    for job_id, attempts, queue, cancel, _ in stale:
        if job_id in waiting and job_id in carried and not cancel:
            continue  # its candidates are queued behind other work, not lost
        with factory.begin() as s:
            moved = lifecycle.worker_lost(s, job_id, attempts, cancel_requested=bool(cancel), stale_before=cutoff)
        if moved is lifecycle.Transition.APPLIED and lifecycle.after_worker_lost(attempts, bool(cancel)) == QUEUED:
            enqueue(job_id, queue)
            requeued.append(job_id)
            log.warning("job %s: worker lost (no heartbeat for %.0f s); queued again", job_id, lease_s)
    return requeued


def start(**_: Any) -> None:
    """Each worker's main process re-queues jobs whose worker died (stale heartbeat) and publishes queued
    jobs that no broker message carries, every lease/3 s (or job_reconcile_after_s, if shorter); and applies
    the retention of finished jobs' files and removes stray files (app/gc.py) at start and every gc_interval_s."""
    settings = get_settings()

    def loop() -> None:
        queue = CeleryQueue(settings)
        next_gc = time.monotonic()  # once at start, then every gc_interval_s
        while True:
            if time.monotonic() >= next_gc:
                next_gc = time.monotonic() + settings.gc_interval_s
                try:
                    gc.collect(sessions(), Storage(settings.data_dir), settings)
                except Exception:
                    log.warning("retention / stray-file collection failed", exc_info=True)
            time.sleep(max(1.0, min(settings.job_lease_s / 3, settings.job_reconcile_after_s)))
            try:
                sweep_stale(sessions(), settings.job_lease_s, queue.enqueue, queue.held_job_ids)
            except Exception:
                log.warning("stale-job sweep failed", exc_info=True)
            try:
                reconcile(sessions(), queue, settings.job_reconcile_after_s)
            except Exception:
                log.warning("queue reconciliation failed", exc_info=True)
            try:
                webhooks.notify_missed(sessions(), settings, settings.job_reconcile_after_s)
            except Exception:
                log.warning("delivering missed webhooks failed", exc_info=True)

    threading.Thread(target=loop, name="lowbit-sweeper", daemon=True).start()
