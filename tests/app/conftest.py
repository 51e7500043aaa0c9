"""API test harness: the real app on a real database (SQLite file, and PostgreSQL with Alembic
migrations applied), a queue that records what was enqueued, and the real worker code path to run it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker
from app.jobs.models import Job
from app.main import create_app
from app.migrate import upgrade
from app.settings import Settings


@dataclass
class RecordingQueue:
    """Records job ids; checks each was committed before it was enqueued (a fresh session sees it)."""

    factory: sessionmaker[Session]
    enqueued: list[tuple[str, str]] = field(default_factory=list)
    committed_before_enqueue: list[bool] = field(default_factory=list)
    fail: bool = False

    def enqueue(self, job_id: str, queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        with self.factory() as s:
            self.committed_before_enqueue.append(s.get(Job, job_id) is not None)
        self.enqueued.append((job_id, queue))

    def ping(self) -> None:
        if self.fail:
            raise ConnectionError("broker down")


@dataclass
class Harness:
    client: TestClient
    settings: Settings
    queue: RecordingQueue
    factory: sessionmaker[Session]
    backend: str

    def csrf(self) -> str:
        """The CSRF token the pages' forms carry (read from the job list's upload form)."""
        m = re.search(r'name="csrf_token" value="([^"]+)"', self.client.get("/").text)
        assert m, "the job list has no CSRF token"
        return m.group(1)

    def run_queued(self) -> list[str]:
        """Run every enqueued job through the worker's code path, as a worker process would."""
        from worker.tasks import execute

        states = []
        while self.queue.enqueued:
            job_id, _ = self.queue.enqueued.pop(0)
            states.append(execute(job_id, self.settings, self.factory))
            self.check_report(job_id)
        return states

    def check_report(self, job_id: str) -> None:
        """Every report a job stores follows the typed contract (worker/engine/report.py), as stored."""
        from tests.reports import assert_report_valid

        with self.factory() as s:
            job = s.get(Job, job_id)
            report = job.report if job is not None else None
        if report is not None:
            assert_report_valid(report)


def _truncate(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("TRUNCATE jobs, datasets, models, uploads, api_keys, workers CASCADE"))
        c.execute(sa.text("DELETE FROM tenants WHERE id <> 'local'"))
        # A test that set the local tenant's limits must not leave them to later tests on this database.
        c.execute(sa.text("UPDATE tenants SET max_active_jobs = NULL, uploads_per_minute = NULL, "
                          "storage_quota_bytes = NULL WHERE id = 'local'"))
    engine.dispose()


@pytest.fixture(scope="session")
def migrated_postgres(postgres_url: str) -> str:
    upgrade(postgres_url)
    return postgres_url


@contextmanager
def harness(request: pytest.FixtureRequest, tmp_path: Path, backend: str,
            **settings_overrides: Any) -> Iterator[Harness]:
    """The real app on ``backend`` ('sqlite' or 'postgres', migrated), with a recording queue."""
    if backend == "postgres":
        url = request.getfixturevalue("migrated_postgres")
    else:
        url = f"sqlite:///{tmp_path / 'lowbit.db'}"
        upgrade(url)
    settings = Settings(**{"data_dir": tmp_path / "data", "database_url": url, "worker_threads": 1,
                           "worker_device": "cpu", "webhook_allow_private": True,
                           "max_upload_bytes": 64 * 1024 * 1024, **settings_overrides})
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    queue = RecordingQueue(factory)
    app = create_app(settings, queue=queue)
    try:
        with TestClient(app) as client:
            yield Harness(client, settings, queue, factory, backend)
    finally:
        app.state.engine.dispose()
        engine.dispose()
        if backend == "postgres":
            _truncate(url)


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    with harness(request, tmp_path, request.param) as h:
        yield h


@pytest.fixture(params=["sqlite", "postgres"])
def keyed_api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A server that requires API keys (as one bound to a public address does)."""
    with harness(request, tmp_path, request.param, require_keys=True) as h:
        yield h


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Harness]:
    url = f"sqlite:///{tmp_path / 'lowbit.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url,
                        worker_threads=1, worker_device="cpu", webhook_allow_private=True,
                        max_upload_bytes=64 * 1024 * 1024)
    factory = make_sessionmaker(make_engine(url))
    queue = RecordingQueue(factory)
    with TestClient(create_app(settings, queue=queue)) as client:
        yield Harness(client, settings, queue, factory, "sqlite")
