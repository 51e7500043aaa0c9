"""Server-sent events for one job (``GET /api/v1/jobs/{id}/events``).

The stream reads the job's row every ``events_poll_s`` and sends what changed:

- ``event: stage`` — ``{"stage", "started_at", "finished_at"}``, once for every stage the job entered, in
  order. Stages come from the start times the worker records, so a stage shorter than the poll interval is
  not missed, and a client that connects late still gets the stages so far.
- ``event: job`` — the job as ``GET /api/v1/jobs/{id}`` returns it, on connect and whenever its status, stage
  or progress changes.
- ``event: end`` — the finished job (succeeded, failed or cancelled); the stream closes after it.
- ``event: gone`` — the job was deleted; the stream closes.

A comment line (``: keep-alive``) goes out after ``events_heartbeat_s`` without an event, so proxies keep the
connection open and a client can tell a quiet job from a dead connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from app.errors import NotFound
from app.jobs.models import FINISHED, Job
from app.jobs.service import to_out
from app.uploads import is_uuid

# A stream ends after this long even if the job has not (a client reconnects; EventSource does by itself).
MAX_STREAM_S = 3600.0
RETRY_MS = 2000


@dataclass(frozen=True)
class Snapshot:
    job: dict[str, Any]
    stages: list[dict[str, Any]]

    @property
    def key(self) -> tuple[Any, ...]:
        return self.job["status"], self.job["stage"], self.job["progress"]

    @property
    def finished(self) -> bool:
        return self.job["status"] in FINISHED


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def stage_list(stage_times: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The stages a job went through, in the order they started."""
    items = sorted((stage_times or {}).items(), key=lambda kv: kv[1].get("started") or 0.0)
    return [{"stage": name, "started_at": _iso(t.get("started")), "finished_at": _iso(t.get("finished"))}
            for name, t in items]


def read(factory: sessionmaker[Session], job_id: str) -> Snapshot | None:
    with factory() as s:
        job = s.get(Job, job_id) if is_uuid(job_id) else None
        if job is None:
            return None
        return Snapshot(to_out(job).model_dump(mode="json"), stage_list(job.stage_times))


def first_snapshot(factory: sessionmaker[Session], job_id: str, tenant_id: str) -> Snapshot:
    with factory() as s:
        owner = s.scalar(sa.select(Job.tenant_id).where(Job.id == job_id)) if is_uuid(job_id) else None
    snap = read(factory, job_id) if owner == tenant_id else None
    if snap is None:
        raise NotFound(f"no job with id '{job_id}'", code="job_not_found")
    return snap


def message(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream(request: Request, factory: sessionmaker[Session], job_id: str, first: Snapshot,
                 poll_s: float, heartbeat_s: float) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    sent_stages = 0
    last_key: tuple[Any, ...] | None = None
    snap: Snapshot | None = first
    while True:
        if snap is None:
            yield message("gone", {"id": job_id, "error": {"code": "job_not_found",
                                                          "message": f"job '{job_id}' was deleted"}})
            return
        out: list[str] = []
        for st in snap.stages[sent_stages:]:
            out.append(message("stage", st))
        sent_stages = max(sent_stages, len(snap.stages))
        if snap.finished:
            out.append(message("end", snap.job))
        elif snap.key != last_key:
            out.append(message("job", snap.job))
            last_key = snap.key
        now = time.monotonic()
        if out:
            yield "".join(out)
            last_sent = now
        elif now - last_sent >= heartbeat_s:
            yield ": keep-alive\n\n"
            last_sent = now
        if snap.finished or now - started > MAX_STREAM_S or await request.is_disconnected():
            return
        await asyncio.sleep(poll_s)
        snap = await run_in_threadpool(read, factory, job_id)
