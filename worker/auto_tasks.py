"""The auto recipe on the queue: each candidate configuration is its own Celery sub-task, so every worker
on the job's queue helps, and more workers finish an auto job sooner.

There is no result backend (the broker only carries ids; the database row is the truth), so the fan-in goes
through the database:

1. ``start`` (the job's own task, once it has claimed the job) plans the first round in a sandboxed child
   (it reads the upload, and exports a .pt2 to ONNX to see what its candidates will quantize; the export is
   cached for the candidates' runs), records one ``auto_candidates`` row per candidate, and runs the first
   static candidate itself: it calibrates once with histograms, so the other candidates read cached
   statistics whatever their method, and measures each layer's sensitivity, which orders the fallback.
   Then it sends one sub-task per remaining candidate to the job's queue and returns.
2. ``run_candidate`` (a sub-task) claims its row with a conditional UPDATE (a duplicate message is a no-op),
   runs the candidate through the same sandboxed engine entry point as any job (``runner.run_engine``) with no
   transaction open, records the result with the worker's hostname:pid, and refreshes the job's heartbeat
   meanwhile. A candidate that would start after the job's time budget is recorded as skipped instead.
3. The sub-task that finds no candidate of its round left unfinished moves ``jobs.auto_round`` on with a
   conditional UPDATE: exactly one wins, and it plans the next greedy round (and sends it) or concludes:
   the candidate ``auto.choose`` picks among those that met the target becomes the job's artifact, or the
   job fails with ``accuracy_target_not_met`` and keeps a report showing the best candidate and its distance
   to the target.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.broker import TASK_AUTO_CANDIDATE
from app.db import utcnow
from app.jobs import lifecycle
from app.jobs.lifecycle import Transition
from app.jobs.models import (
    CANDIDATE_FINISHED,
    CANDIDATE_PENDING,
    CANDIDATE_RUNNING,
    FAILED,
    RUNNING,
    AutoCandidate,
    Job,
)
from app.settings import Settings, get_settings
from app.storage import Storage
from app.uploads import new_id
from app.webhooks import notify
from worker import runner, sandbox
from worker.celery_app import celery_app
from worker.engine import auto
from worker.engine.config import QuantizeConfig, parse_options
from worker.engine.errors import EngineError, JobCancelled
from worker.engine.files import place, sha256_file
from worker.engine.target import check_target
from worker.runner import HandedBack, LeaseLost, Watch, worker_id

log = logging.getLogger(__name__)


def _celery_send(job_id: str, attempt: int, idx: int, queue: str) -> None:
    celery_app.send_task(TASK_AUTO_CANDIDATE, args=[job_id, attempt, idx], queue=queue)


# How a candidate sub-task is sent: through the broker. Tests that run the worker code path in-process
# replace it with a local queue.
send: Callable[[str, int, int, str], None] = _celery_send


@dataclass
class _Job:
    job_id: str
    attempt: int
    queue: str  # where its candidates' sub-tasks go
    device: str  # the hardware it asked for (Job.device)
    options: dict[str, Any]
    target: dict[str, Any]
    started_at: Any
    model_path: Path | None
    calib_path: Path | None
    eval_path: Path | None


def _load(factory: sessionmaker[Session], job_id: str, attempt: int) -> _Job | None:
    with factory() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != RUNNING or job.attempts != attempt:
            return None
        return _Job(job_id, attempt, job.queue, job.device, dict(job.options), dict(job.accuracy_target or {}),
                    job.started_at, *runner.job_files(s, job))


def _paths(s: Settings, job_id: str, attempt: int) -> tuple[Path, Path, Path]:
    """(the job's artifact, the candidates' artifacts folder, the candidates' work folder) of this attempt."""
    job_dir = Storage(s.data_dir).job_dir(job_id)
    return job_dir / f"model.quantized.{attempt}.onnx", job_dir / f"auto-{attempt}", job_dir / f"work-{attempt}"


def _base_config(s: Settings, j: _Job) -> QuantizeConfig:
    if j.model_path is None or not j.model_path.exists():
        raise EngineError("model_missing", "the job's model file is gone from storage; upload it again")
    artifact, _, work = _paths(s, j.job_id, j.attempt)
    return QuantizeConfig(
        model_path=j.model_path, output_path=artifact, recipe="auto", options=parse_options("auto", j.options),
        calibration_path=j.calib_path, eval_path=j.eval_path, work_dir=work, threads=s.worker_threads,
        device=runner.engine_device(j.device, s), job_id=j.job_id,
        cache_dir=s.data_dir / "cache" / "calibration", export_cache_dir=s.data_dir / "cache" / "pt2-export",
    )


def _deadline(j: _Job) -> float | None:
    budget = j.target.get("time_budget_s")
    if budget is None or j.started_at is None:
        return None
    return float((j.started_at + timedelta(seconds=float(budget))).timestamp())


def _watch(factory: sessionmaker[Session], j: _Job) -> Watch:
    """The engine's progress callback for one candidate (or the planning) of the job: it refreshes the job's
    heartbeat and stops the candidate when the job is cancelled or no longer this attempt's; the job's stage
    and progress count candidates, not one candidate's stages."""
    return Watch(factory, j.job_id, j.attempt, record_progress=False)


def _progress(factory: sessionmaker[Session], j: _Job, stage: str | None = None,
              percent: int | None = None) -> Transition:
    with factory.begin() as s:
        return lifecycle.progress(s, j.job_id, j.attempt, stage=stage, percent=percent)


def _plan(s: Settings, factory: sessionmaker[Session], j: _Job, base: QuantizeConfig) -> list[auto.Candidate]:
    """``auto.plan`` in a sandboxed child with a job's limits (as ``runner.run_engine`` sets them), refreshing the
    job's heartbeat meanwhile: it parses the upload, and a .pt2's export runs PyTorch on it."""
    # Planning writes no artifact, only the export cache: no file-size limit.
    limits = runner.job_limits(base.device, s, file_limit=False)
    watch = _watch(factory, j)
    rows = sandbox.run("worker.engine.auto:plan_in_child", base, limits, tick=lambda: watch("preparing", 0.0),
                       preload=runner.ENGINE_PRELOAD, spare=True)
    return [auto.Candidate.from_dict(r) for r in rows]


def start(job_id: str, attempt: int, s: Settings, factory: sessionmaker[Session]) -> str:
    """The auto job's own task, after it claimed the job: plan, run the analysis candidate, fan out."""
    j = _load(factory, job_id, attempt)
    if j is None:
        return "skipped"
    work = _paths(s, job_id, attempt)[2]
    try:
        check_target(j.target)
        base = _base_config(s, j)
        planned = _plan(s, factory, j, base)
    except JobCancelled:
        _cancel(factory, s, j)
        return "cancelled"
    except LeaseLost:
        shutil.rmtree(work, ignore_errors=True)  # what a killed planning child left there
        return "lost"
    except EngineError as exc:
        shutil.rmtree(work, ignore_errors=True)
        _fail(factory, j, exc.code, exc.message)
        return FAILED
    except Exception as exc:  # a bug: still a recorded, readable failure
        shutil.rmtree(work, ignore_errors=True)
        log.exception("auto job %s could not be planned", job_id)
        _fail(factory, j, "internal_error", f"unexpected error while planning the auto search "
              f"({type(exc).__name__}: {str(exc)[:300]}); this is a lowbit problem, please report it")
        return FAILED
    with factory.begin() as sess:
        for idx, cand in enumerate(planned):
            sess.add(AutoCandidate(id=new_id(), job_id=job_id, attempt=attempt, idx=idx, round=1,
                                   candidate=cand.to_dict(), status=CANDIDATE_PENDING))
        lifecycle.start_search(sess, job_id, attempt)
    # The first candidate runs here, before the others are sent: it fills the calibration cache they read.
    state = run_candidate(job_id, attempt, 0, s, factory, analysis=True)
    if state == "handed_back":
        # The whole job goes back to the queue as if this attempt had never started: the next claim gets the
        # same attempt number, so this attempt's candidate rows and files go first.
        with factory.begin() as sess:
            sess.execute(sa.delete(AutoCandidate).where(AutoCandidate.job_id == job_id,
                                                        AutoCandidate.attempt == attempt))
        for path in _paths(s, job_id, attempt)[1:]:
            shutil.rmtree(path, ignore_errors=True)
        runner.hand_back(factory, s, job_id, attempt, j.queue)
        return state
    if state in ("cancelled", "lost"):
        return state
    _progress(factory, j, stage="quantizing")
    for idx in range(1, len(planned)):
        send(job_id, attempt, idx, j.queue)
    return RUNNING


def run_candidate(job_id: str, attempt: int, idx: int, s: Settings | None = None,
                  factory: sessionmaker[Session] | None = None, analysis: bool = False) -> str:
    """One candidate sub-task: claim its row, run it (or skip it past the time budget), record the result,
    and move the search on if it was the last of its round."""
    s = s or get_settings()
    factory = factory or runner.sessions()
    me = worker_id()
    with factory.begin() as sess:
        res = sess.execute(sa.update(AutoCandidate).where(
            AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempt, AutoCandidate.idx == idx,
            AutoCandidate.status == CANDIDATE_PENDING).values(status=CANDIDATE_RUNNING, worker=me,
                                                               started_at=utcnow()))
        if not res.rowcount:  # type: ignore[attr-defined]
            return "skipped"  # a duplicate message, or a search that is over
        row = sess.execute(sa.select(AutoCandidate.candidate, AutoCandidate.round).where(
            AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempt, AutoCandidate.idx == idx)).one()
    cand, rnd = auto.Candidate.from_dict(row.candidate), int(row.round)
    j = _load(factory, job_id, attempt)
    if j is None:  # cancelled, deleted or re-queued meanwhile
        _record(factory, job_id, attempt, idx, auto.skipped(cand, "not started: the job is no longer running"), me)
        return "skipped"
    deadline = _deadline(j)
    if deadline is not None and time.time() > deadline:
        result = auto.skipped(cand, f"not started: the time budget of {j.target['time_budget_s']} s was spent")
    else:
        _, cand_dir, work = _paths(s, job_id, attempt)
        try:
            cfg = auto.candidate_config(_base_config(s, j), cand, cand_dir / f"candidate-{idx}.onnx",
                                        work / f"candidate-{idx}", analysis=analysis)
            result = auto.evaluate(cand, cfg, j.target, lambda c: runner.run_engine(c, _watch(factory, j), s), me)
        except JobCancelled:
            _cancel(factory, s, j)
            return "cancelled"
        except LeaseLost:
            return "lost"
        except HandedBack:
            # This worker is shutting down (SIGTERM): the candidate has not failed, it goes back to pending
            # for another worker, as a plain job is handed back (the analysis candidate is the job's own
            # task: start() hands the whole job back).
            _unclaim(factory, job_id, attempt, idx, me)
            if not analysis:
                send(job_id, attempt, idx, j.queue)
                log.warning("auto job %s: worker shutting down; candidate %d was handed back", job_id, idx)
            return "handed_back"
        except EngineError as exc:  # the sandbox's own failures (crash, memory, time) fail the candidate only
            result = auto.CandidateResult(cand, "failed", error={"code": exc.code, "message": exc.message}, worker=me)
        except Exception as exc:  # a bug: this candidate fails, readably, and the search goes on without it
            log.exception("auto job %s: candidate %d crashed", job_id, idx)
            text = f"{getattr(exc, 'type_name', type(exc).__name__)}: {str(getattr(exc, 'message', exc))[:300]}"
            result = auto.CandidateResult(cand, "failed", worker=me, error={
                "code": "internal_error", "message": f"unexpected error in this candidate ({text})"})
        finally:
            shutil.rmtree(work / f"candidate-{idx}", ignore_errors=True)
    _record(factory, job_id, attempt, idx, result, me)
    _advance(job_id, attempt, rnd, s, factory)
    return result.status


def _unclaim(factory: sessionmaker[Session], job_id: str, attempt: int, idx: int, me: str) -> None:
    with factory.begin() as sess:
        sess.execute(sa.update(AutoCandidate).where(
            AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempt, AutoCandidate.idx == idx,
            AutoCandidate.status == CANDIDATE_RUNNING, AutoCandidate.worker == me).values(
            status=CANDIDATE_PENDING, worker=None, started_at=None))


def _record(factory: sessionmaker[Session], job_id: str, attempt: int, idx: int, result: auto.CandidateResult,
            me: str) -> None:
    from worker.engine.validate import finite_or_none  # lazy: validate loads ONNX Runtime (main process)

    result.worker = result.worker or me
    with factory.begin() as sess:
        sess.execute(sa.update(AutoCandidate).where(
            AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempt, AutoCandidate.idx == idx).values(
            status=result.status, result=finite_or_none(result.to_dict()), finished_at=utcnow()))
        done, total = sess.execute(sa.select(
            sa.func.count().filter(AutoCandidate.status.in_(CANDIDATE_FINISHED)), sa.func.count()).where(
            AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempt)).one()
        # The job's progress counts finished candidates (of those planned so far).
        lifecycle.progress(sess, job_id, attempt, percent=min(95, 5 + int(90 * done / max(1, total))))


def _results(factory: sessionmaker[Session], job_id: str, attempt: int) -> list[auto.CandidateResult]:
    with factory() as sess:
        rows = sess.execute(sa.select(AutoCandidate.result).where(
            AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempt,
            AutoCandidate.status.in_(CANDIDATE_FINISHED)).order_by(AutoCandidate.idx)).scalars().all()
    return [auto.CandidateResult.from_dict(r) for r in rows if r]


def _advance(job_id: str, attempt: int, rnd: int, s: Settings, factory: sessionmaker[Session]) -> None:
    """If this round is complete, exactly one caller (the conditional UPDATE's winner) moves the search on."""
    with factory() as sess:
        unfinished = sess.execute(sa.select(sa.func.count()).where(
            AutoCandidate.job_id == job_id, AutoCandidate.attempt == attempt,
            AutoCandidate.status.in_((CANDIDATE_PENDING, CANDIDATE_RUNNING)))).scalar_one()
    if unfinished:
        return
    with factory.begin() as sess:
        won = lifecycle.advance_round(sess, job_id, attempt, rnd)
    if won is not Transition.APPLIED:
        return
    j = _load(factory, job_id, attempt)
    if j is None:
        return
    results = _results(factory, job_id, attempt)
    opts = parse_options("auto", j.options)
    deadline = _deadline(j)
    nxt = [] if deadline is not None and time.time() > deadline else \
        auto.next_candidates(results, opts.max_fallback_steps, opts.nodes_to_exclude, opts.prefer,
                             opts.float_fallback_only)
    if nxt:
        first = len(results)
        with factory.begin() as sess:
            for k, cand in enumerate(nxt):
                sess.add(AutoCandidate(id=new_id(), job_id=job_id, attempt=attempt, idx=first + k, round=rnd + 1,
                                       candidate=cand.to_dict(), status=CANDIDATE_PENDING))
        for k in range(len(nxt)):
            send(job_id, attempt, first + k, j.queue)
        return
    _conclude(j, results, rnd, s, factory)


def _conclude(j: _Job, results: list[auto.CandidateResult], rounds: int, s: Settings,
              factory: sessionmaker[Session]) -> None:
    from worker.engine.validate import finite_or_none  # lazy: validate loads ONNX Runtime (main process)

    artifact, cand_dir, work = _paths(s, j.job_id, j.attempt)
    started = j.started_at.timestamp() if j.started_at is not None else time.time()
    opts = parse_options("auto", j.options)
    outcome = auto.conclude(results, j.target, j.job_id, opts.to_dict("auto"), time.time() - started, rounds,
                            opts.prefer)
    report = outcome.report
    _progress(factory, j, stage="validating", percent=96)
    if outcome.chosen is not None and outcome.chosen.artifact_path:
        # The chosen candidate again, validated on the confirmation samples no candidate saw, through the same
        # sandboxed runner as the candidates (auto.confirm sets report.accuracy and accuracy_target from it).
        try:
            auto.confirm(outcome, j.target, _base_config(s, j),
                         lambda c: runner.run_engine(c, _watch(factory, j), s), cand_dir / "confirmation.onnx",
                         work / "confirmation")
        except JobCancelled:
            _cancel(factory, s, j)
            return
        except LeaseLost:
            return
        except EngineError as exc:  # the job's files went missing meanwhile: a readable failure
            _fail(factory, j, exc.code, exc.message)
            shutil.rmtree(cand_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            return
    _progress(factory, j, stage="reporting", percent=98)
    if outcome.chosen is not None and outcome.artifact is not None:
        place(outcome.artifact, artifact)
        with factory.begin() as sess:
            ok = lifecycle.succeed(sess, j.job_id, j.attempt, report=finite_or_none(report),
                                   artifact_path=str(artifact), artifact_sha256=sha256_file(artifact),
                                   artifact_bytes=artifact.stat().st_size)
        if ok is not Transition.APPLIED:
            artifact.unlink(missing_ok=True)
    else:
        # auto.conclude wrote report.accuracy_target (met: false, the best candidate's distance).
        code, message = auto.failure(outcome, j.target)
        with factory.begin() as sess:
            lifecycle.fail(sess, j.job_id, j.attempt, code, message, keep_stage=False, report=finite_or_none(report))
    shutil.rmtree(cand_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log.info("auto job %s concluded after %d round(s): %s", j.job_id, rounds,
             outcome.chosen.candidate.config() if outcome.chosen else "target not met")
    notify(factory, s, j.job_id)


def _fail(factory: sessionmaker[Session], j: _Job, code: str, message: str) -> None:
    with factory.begin() as s:
        lifecycle.fail(s, j.job_id, j.attempt, code, message, keep_stage=False)


def _cancel(factory: sessionmaker[Session], s: Settings, j: _Job) -> None:
    with factory.begin() as sess:
        ended = lifecycle.finish_cancelled(sess, j.job_id, j.attempt)
    if ended is Transition.APPLIED:
        Storage(s.data_dir).remove_job(j.job_id)
        notify(factory, s, j.job_id)


@celery_app.task(name=TASK_AUTO_CANDIDATE, acks_late=True, ignore_result=True)
def auto_candidate(job_id: str, attempt: int, idx: int) -> str:
    log.info("worker %s running candidate %d of auto job %s", worker_id(), idx, job_id)
    return run_candidate(job_id, attempt, idx)
