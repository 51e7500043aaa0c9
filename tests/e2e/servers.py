"""Private server instances for tests that stop, kill or wipe their servers: a redis-server and a PostgreSQL
cluster of their own on free ports, so the shared servers other tests use are never disturbed."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE
from tests.e2e.conftest import free_port


def _missing(what: str) -> None:
    msg = f"{what} is not installed"
    if REQUIRE:
        pytest.fail(msg + " (LOWBIT_REQUIRE_SERVICES is set, so this is an error)")
    pytest.skip(msg)


class PrivateRedis:
    """redis-server on a free port, without persistence: ``restart_empty`` is Redis losing all its data."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            _missing("redis-server")
        self.port = free_port()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart_empty(self) -> None:
        self.kill()
        self.start()


class PrivatePostgres:
    """A throwaway PostgreSQL cluster (initdb as the postgres user: initdb refuses root) on a free port."""

    def __init__(self, workdir: Path) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            _missing("PostgreSQL (initdb)")
        self.bin = Path(bins[-1]).parent
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.data = workdir / "pgdata"
        self.data.mkdir()
        self.user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres")
            shutil.chown(self.data, "postgres")
            self.user = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.user, str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--no-sync"], check=True, capture_output=True, timeout=120)
        self.log = workdir / "postgres.log"
        if os.geteuid() == 0:
            self.log.touch()
            shutil.chown(self.log, "postgres")
        self.start()
        subprocess.run([*self.user, str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", "postgres", "lowbit"], check=True, capture_output=True, timeout=60)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/lowbit"

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args],
                       check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        # No unix socket (its default folder may not exist or be shared): TCP on 127.0.0.1 only.
        self._ctl("-w", "-o", f"-p {self.port} -k '' -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._ctl("-w", "-m", "fast", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        if self.running():
            self.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    base = Path(f"/tmp/lowbit-pg-{uuid.uuid4().hex[:8]}")  # short, and readable by the postgres user
    server = PrivatePostgres(base)
    yield server
    server.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def fresh_database(postgres_url: str) -> Iterator[str]:
    """A database of its own on the shared PostgreSQL server, so that a worker's reconciler never sees the
    jobs other tests left behind."""
    import sqlalchemy as sa

    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"lowbit_faults_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


__all__ = ["PrivatePostgres", "PrivateRedis", "fresh_database", "private_postgres",
           "private_redis"]
