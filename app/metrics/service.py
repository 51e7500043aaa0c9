"""The numbers behind ``GET /metrics``, read from the database on each scrape (so every API process reports
the same values, and nothing is lost when a process restarts), in the Prometheus text format 0.0.4."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from app import workers
from app.broker import QUEUES
from app.datasets.models import Dataset
from app.jobs.models import FINISHED, QUEUED, Job, WebhookDelivery
from app.jobs.service import STATUSES
from app.modelfiles.models import ModelFile

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0)
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def _head(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def gauge(self, name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        self._head(name, "gauge", help_text)
        self.lines += [f"{name}{_labels(labels)} {_num(v)}" for labels, v in samples]

    def histogram(self, name: str, help_text: str, buckets: Sequence[float],
                  series: dict[Labels, list[float]]) -> None:
        self._head(name, "histogram", help_text)
        for labels, values in sorted(series.items()):
            for bound in (*buckets, math.inf):
                n = sum(1 for v in values if v <= bound)
                self.lines.append(f"{name}_bucket{_labels((*labels, ('le', _num(bound))))} {_num(n)}")
            self.lines.append(f"{name}_sum{_labels(labels)} {_num(sum(values))}")
            self.lines.append(f"{name}_count{_labels(labels)} {_num(len(values))}")

    def counter(self, name: str, help_text: str, value: float) -> None:
        self._head(name, "counter", help_text)
        self.lines.append(f"{name} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _stage_seconds(stage_times: Any) -> Iterable[tuple[str, float]]:
    if not isinstance(stage_times, dict):
        return
    for stage, t in stage_times.items():
        if isinstance(t, dict) and t.get("started") is not None and t.get("finished") is not None:
            yield stage, max(0.0, float(t["finished"]) - float(t["started"]))


def render(db: Session, worker_restarts: int | None = None) -> str:
    out = Exposition()

    by_status: dict[tuple[str, str], int] = {
        (recipe, status): n
        for status, recipe, n in db.execute(
            sa.select(Job.status, Job.recipe, sa.func.count()).group_by(Job.status, Job.recipe))
    }
    recipes = sorted({r for r, _ in by_status})
    out.gauge("lowbit_jobs", "Jobs in the database, by status and recipe.",
              [((("recipe", r), ("status", s)), by_status.get((r, s), 0)) for r in recipes for s in STATUSES])

    depth: dict[str, int] = {q: n for q, n in db.execute(
        sa.select(Job.queue, sa.func.count()).where(Job.status == QUEUED).group_by(Job.queue))}
    out.gauge("lowbit_queue_depth", "Jobs waiting for a worker (status queued), by queue.",
              [((("queue", q),), depth.get(q, 0)) for q in sorted({*QUEUES, *depth})])

    live = workers.live_per_queue(db)
    out.gauge("lowbit_live_workers", "Workers alive now (heartbeat not expired) that consume each queue.",
              [((("queue", q),), live.get(q, 0)) for q in sorted({*QUEUES, *live, *depth})])

    durations: dict[Labels, list[float]] = defaultdict(list)
    stages: dict[Labels, list[float]] = defaultdict(list)
    rows = db.execute(sa.select(Job.recipe, Job.status, Job.started_at, Job.finished_at, Job.stage_times)
                      .where(Job.started_at.is_not(None)))
    for recipe, status, started, finished, stage_times in rows:
        if status in FINISHED and finished is not None:
            durations[(("recipe", recipe), ("status", status))].append(
                max(0.0, (finished - started).total_seconds()))
        for stage, seconds in _stage_seconds(stage_times):
            stages[(("recipe", recipe), ("stage", stage))].append(seconds)
    out.histogram("lowbit_job_duration_seconds",
                  "Time from a worker starting a job to the job's end, by recipe and final status.",
                  JOB_BUCKETS, durations)
    out.histogram("lowbit_job_stage_duration_seconds",
                  "Time jobs spent in each stage (stages that have ended), by recipe and stage.",
                  STAGE_BUCKETS, stages)

    uploads = []
    for kind, table in (("model", ModelFile), ("dataset", Dataset)):
        n, total = db.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(table.size_bytes), 0))).one()
        uploads.append((kind, int(n), int(total)))
    out.gauge("lowbit_upload_bytes", "Bytes of stored uploads, by kind.",
              [((("kind", k),), total) for k, _, total in uploads])
    out.gauge("lowbit_uploads", "Stored uploads, by kind.", [((("kind", k),), n) for k, n, _ in uploads])

    deliveries: dict[str, int] = {s: n for s, n in db.execute(
        sa.select(WebhookDelivery.status, sa.func.count()).group_by(WebhookDelivery.status))}
    out.gauge("lowbit_webhook_deliveries", "Webhook deliveries, by status (pending, delivered, failed).",
              [((("status", s),), deliveries.get(s, 0)) for s in sorted({"pending", "delivered", "failed",
                                                                         *deliveries})])
    if worker_restarts is not None:
        out.counter("lowbit_worker_restarts_total",
                    "Embedded worker processes that died and were restarted by this lowbit serve.", worker_restarts)
    return out.text()
