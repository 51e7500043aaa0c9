"""Hands job ids to the broker. Only ids travel; the worker reads everything else from the database."""

from __future__ import annotations

from typing import Protocol

from app.settings import Settings


class JobQueue(Protocol):
    def enqueue(self, job_id: str, queue: str) -> None: ...

    def ping(self) -> None: ...


class CeleryQueue:
    def __init__(self, settings: Settings) -> None:
        from worker.celery_app import make_celery

        self.settings = settings
        self.celery = make_celery(settings)

    def enqueue(self, job_id: str, queue: str) -> None:
        from worker.celery_app import TASK_RUN_JOB

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
