"""Alembic migrations create exactly the tables the models describe, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from app.datasets import models as _d  # noqa: F401
from app.db import Base
from app.jobs import models as _j  # noqa: F401
from app.migrate import downgrade, upgrade
from app.modelfiles import models as _m  # noqa: F401
from app.resumable import models as _r  # noqa: F401


def _fresh_postgres(postgres_url: str) -> tuple[str, sa.Engine]:
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"lowbit_mig_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return postgres_url.rsplit("/", 1)[0] + f"/{name}", admin


def _check(url: str) -> None:
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert {"models", "datasets", "jobs", "alembic_version"} <= tables
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
    upgrade(url)  # idempotent: already at head
    downgrade(url, "base")
    with engine.connect() as conn:
        assert not {"models", "datasets", "jobs"} & set(sa.inspect(conn).get_table_names())
    upgrade(url)
    engine.dispose()


def test_migrations_on_postgres(postgres_url: str) -> None:
    url, admin = _fresh_postgres(postgres_url)
    try:
        _check(url)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        admin.dispose()


def test_migrations_on_sqlite(tmp_path: Path) -> None:
    _check(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.parametrize("status", ["queued", "succeeded"])
def test_jobs_table_accepts_a_row(tmp_path: Path, status: str) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO models (id, filename, format, size_bytes, sha256, opset, inputs, outputs, "
                          "storage_path, created_at) VALUES ('m', 'f', 'onnx', 1, 's', 17, '[]', '[]', 'p', "
                          "CURRENT_TIMESTAMP)"))
        c.execute(sa.text("INSERT INTO jobs (id, model_id, recipe, options, queue, status, progress, "
                          "cancel_requested, attempts, created_at) VALUES ('j', 'm', 'int8_static', '{}', 'cpu', "
                          ":s, 0, false, 0, CURRENT_TIMESTAMP)"), {"s": status})
        assert c.execute(sa.text("SELECT status FROM jobs")).scalar() == status
    engine.dispose()


def _backfill(url: str) -> None:
    upgrade(url, "0007_storage_bounds")
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO models (id, filename, format, size_bytes, sha256, opset, inputs, outputs, "
                          "storage_path, created_at) VALUES ('m', 'f', 'onnx', 1, 's', 17, '[]', '[]', 'p', "
                          "CURRENT_TIMESTAMP)"))
        for job_id, queue in (("on-cpu", "cpu"), ("on-gpu", "gpu")):
            c.execute(sa.text("INSERT INTO jobs (id, tenant_id, model_id, recipe, options, queue, status, progress, "
                              "cancel_requested, attempts, created_at) VALUES (:id, 'local', 'm', 'int8_static', "
                              "'{}', :q, 'queued', 0, false, 0, CURRENT_TIMESTAMP)"), {"id": job_id, "q": queue})
    upgrade(url)
    with engine.connect() as c:
        rows: dict[str, str] = dict(c.execute(sa.text("SELECT id, device FROM jobs")).tuples().all())
    assert rows == {"on-cpu": "cpu", "on-gpu": "gpu"}  # a gpu-queue job asked for the gpu
    engine.dispose()


def test_job_device_is_backfilled_from_the_queue_on_sqlite(tmp_path: Path) -> None:
    _backfill(f"sqlite:///{tmp_path / 'b.db'}")


def test_job_device_is_backfilled_from_the_queue_on_postgres(postgres_url: str) -> None:
    url, admin = _fresh_postgres(postgres_url)
    try:
        _backfill(url)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        admin.dispose()
