"""The ``lowbit`` command: serve, worker, migrate and an offline ``quantize``; and the client commands
(submit, status, download, report, jobs, cancel: ``app/client/cli.py``) that talk to a running server."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.client.cli import (
    EXIT_INTERNAL,
    EXIT_UNREACHABLE,
    ReportSections,
    add_commands,
    ci_text,
    internal_error,
    latency_change,
    output_line,
    parse_option,
    signed_end,
)
from app.client.errors import LowbitClientError
from worker.engine.recipes import REGISTRY, describe_recipes
from worker.engine.recipes.options import CALIBRATION_METHODS


def _settings() -> Any:
    # lazy: pydantic settings load only for the commands that read them (the CLI's fast start)
    from app.settings import get_settings

    return get_settings()


def cmd_migrate(_: argparse.Namespace) -> int:
    # lazy: keeps `import app.cli` light (the CLI's fast start) (alembic, sqlalchemy)
    from app.migrate import upgrade

    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.resolved_database_url)
    print(f"database at head: {s.resolved_database_url.split('@')[-1]}")
    return 0


def worker_argv(queues: str, concurrency: int, embedded: bool, loglevel: str = "INFO",
                name: str | None = None) -> list[str]:
    argv = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", queues, "--concurrency", str(concurrency), "--loglevel", loglevel,
        "--without-mingle", "--without-gossip",
    ]
    if name:  # several workers on one host need distinct node names
        argv += ["--hostname", f"{name}@%h"]
    if embedded:
        argv.append("--without-heartbeat")
    return argv


def cmd_worker(args: argparse.Namespace) -> int:
    s = _settings()
    queues = args.queues or s.worker_queues
    argv = worker_argv(queues, args.concurrency or s.worker_concurrency, s.uses_filesystem_broker, args.loglevel)
    if args.memory_gb is not None:  # read by the worker's heartbeat (Settings.worker_memory_gb)
        os.environ["LOWBIT_WORKER_MEMORY_GB"] = str(args.memory_gb)
    os.execv(sys.executable, argv)
    return 0  # pragma: no cover


def cmd_worker_health(_: argparse.Namespace) -> int:
    """Exit 0 when a worker on this host has a live heartbeat row (a container's health check), else 1."""
    # lazy: keeps `import app.cli` light (the CLI's fast start) (sqlalchemy, the tables)
    import socket

    import sqlalchemy as sa

    from app.db import make_engine, make_sessionmaker, utcnow
    from app.jobs.models import Worker

    s = _settings()
    host = socket.gethostname()
    engine = make_engine(s.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            rows = db.execute(sa.select(Worker.id, Worker.queues, Worker.heartbeat_at)
                              .where(Worker.hostname == host, Worker.expires_at > utcnow())).all()
    except sa.exc.SQLAlchemyError as exc:
        print(f"lowbit: worker-health: cannot read the workers table ({type(exc).__name__}); is the database "
              "reachable and migrated ('lowbit migrate')?", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if not rows:
        print(f"lowbit: worker-health: no worker on {host} has sent a heartbeat within its last three intervals "
              f"(LOWBIT_WORKER_HEARTBEAT_S={s.worker_heartbeat_s:g})", file=sys.stderr)
        return 1
    for worker_id, queues, beat in rows:
        print(f"{worker_id} alive on queues {queues}, last heartbeat {beat:%Y-%m-%d %H:%M:%S} UTC")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Apply the retention now and remove stray files (what workers do every LOWBIT_GC_INTERVAL_S)."""
    # lazy: keeps `import app.cli` light (the CLI's fast start) (sqlalchemy, the tables)
    from app import gc
    from app.db import make_engine, make_sessionmaker
    from app.storage import Storage

    s = _settings()
    if args.retention_days is not None:
        s = s.model_copy(update={"retention_days": args.retention_days})
    engine = make_engine(s.resolved_database_url)
    try:
        out = gc.collect(make_sessionmaker(engine), Storage(s.data_dir), s)
    finally:
        engine.dispose()
    if s.retention_days > 0:
        print(f"retention {s.retention_days:g} day(s): removed the files of {len(out.expired_jobs)} finished job(s)")
    else:
        print("retention off (LOWBIT_RETENTION_DAYS=0): finished jobs keep their files")
    print(f"removed {len(out.stray_paths)} stray file(s) that no job or upload owns; {out.freed_bytes} bytes freed")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # lazy: keeps `import app.cli` light (the CLI's fast start) (uvicorn, the API)
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade

    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        upgrade(s.resolved_database_url)
    supervisor = None
    lock = None
    if not args.no_worker and s.uses_filesystem_broker:
        # One embedded server per data directory: a second would re-queue the first one's running jobs.
        import fcntl

        lock = open(s.data_dir / "serve.lock", "w")  # noqa: SIM115 - held for the server's lifetime
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"lowbit: another 'lowbit serve' is using {s.data_dir.resolve()}; stop it first or set "
                  "LOWBIT_DATA_DIR to another folder", file=sys.stderr)
            return 1
        # The embedded worker is the only one on this data directory, so a job left 'running' was
        # cut off when the previous server stopped: queue it again (or fail it after 3 tries).
        _recover_embedded_jobs(s)
    _reconcile_queue(s)
    # SIGTERM (kill, systemd, docker stop) ends the server like Ctrl-C does: through the finally below, which
    # stops the workers. (uvicorn re-raises the signal it caught once it has shut down; with the default
    # action that would end this process on the spot and orphan the workers.)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if not args.no_worker:
        # lazy: keeps `import app.cli` light (the CLI's fast start) (uvicorn, the API)
        from app.supervisor import Supervisor

        queues = args.queues or "cpu,gpu"
        count = max(1, args.workers)
        supervisor = Supervisor(
            lambda i: worker_argv(queues, s.worker_concurrency, s.uses_filesystem_broker,
                                  name=f"lowbit{i + 1}" if count > 1 else None),
            count, lambda dead: _hand_back_lost(s, dead),
            # Embedded (the lock is ours): every running job of a process on this host that is gone is lost.
            sweep=(lambda: _hand_back_lost(s, set(), any_gone=True)) if lock is not None else None)
    host = args.host or s.host
    port = args.port or s.port
    print(f"lowbit: serving on http://{host}:{port} (data in {s.data_dir.resolve()})", file=sys.stderr)
    # The bind address decides whether keys are required: the app must judge the address it really serves on.
    served = s.model_copy(update={"host": host, "port": port})
    if served.keys_required:
        print("lowbit: API keys required (create one with 'lowbit keys create --tenant NAME'; browsers sign in "
              "at /login)", file=sys.stderr)
    else:
        print(f"lowbit: keyless: bound to {host}, only this machine can connect; binding to any other address "
              "(or LOWBIT_REQUIRE_KEYS=true) requires API keys", file=sys.stderr)
    try:
        if supervisor is not None:
            supervisor.start()
            print(f"lowbit: {len(supervisor.slots)} embedded worker process(es) on queues {queues}, each restarted "
                  "if it dies", file=sys.stderr)
        app = create_app(served)
        app.state.supervisor = supervisor
        # Open event streams (GET /api/v1/jobs/{id}/events) must not hold a shutdown up for ever.
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    except (_Stopped, KeyboardInterrupt):
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the workers' stop short
        if supervisor is not None:
            print("lowbit: stopping the embedded workers (running jobs go back to the queue)", file=sys.stderr)
            supervisor.stop()
    return 0


class _Stopped(Exception):
    """SIGTERM reached `lowbit serve`."""


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise _Stopped()


def _hand_back_lost(s: Any, dead: set[int], any_gone: bool = False) -> None:
    """The embedded supervisor saw these processes of its workers die (with ``any_gone``: any process on this
    host, which only the embedded server, alone on its data directory, may assume): their running jobs go back
    to the queue now (the next attempt takes over), not after the lease."""
    # lazy: keeps `import app.cli` light (the CLI's fast start) (sqlalchemy, Celery)
    import socket

    from app import workers
    from app.db import make_engine, make_sessionmaker
    from app.jobs.service import requeue_lost
    from app.procs import process_gone
    from app.queue import CeleryQueue

    host = socket.gethostname()
    ours = {f"{host}:{pid}" for pid in dead}

    def gone(worker: str | None) -> bool:
        return (any_gone or worker in ours) and process_gone(worker)

    engine = make_engine(s.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            requeued, failed = requeue_lost(db, gone)
            db.commit()
        workers.forget(make_sessionmaker(engine), sorted(ours))  # dead: no longer counted as live
        if requeued:
            queue = CeleryQueue(s)
            for job_id, queue_name in requeued:
                queue.enqueue(job_id, queue_name)
        if requeued or failed:
            print(f"lowbit: {len(requeued)} job(s) of a dead worker process queued again, {len(failed)} failed after "
                  "repeated losses", file=sys.stderr)
    finally:
        engine.dispose()
    if dead:
        _reconcile_queue(s)  # messages the dead worker had taken but not started are gone with it


def _recover_embedded_jobs(s: Any) -> None:
    # lazy: keeps `import app.cli` light (the CLI's fast start) (sqlalchemy, Celery)
    from app.db import make_engine, make_sessionmaker
    from app.jobs.service import recover_interrupted
    from app.queue import CeleryQueue

    engine = make_engine(s.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            requeued, failed = recover_interrupted(db)
            db.commit()
        queue = CeleryQueue(s)
        for job_id, queue_name in requeued:
            queue.enqueue(job_id, queue_name)
        if requeued or failed:
            print(f"lowbit: {len(requeued)} interrupted job(s) queued again, {len(failed)} failed after "
                  "repeated interruptions", file=sys.stderr)
    finally:
        engine.dispose()


def _reconcile_queue(s: Any) -> None:
    """Publish the queued jobs that no broker message carries (an API that died between committing a job and
    publishing it, a broker that lost its data); workers keep doing this while they run."""
    # lazy: keeps `import app.cli` light (the CLI's fast start) (sqlalchemy, Celery)
    from app.db import make_engine, make_sessionmaker
    from app.queue import CeleryQueue, reconcile

    engine = make_engine(s.resolved_database_url)
    try:
        published = reconcile(make_sessionmaker(engine), CeleryQueue(s), s.job_reconcile_after_s)
        if published:
            print(f"lowbit: {len(published)} queued job(s) had no broker message; published again", file=sys.stderr)
    except Exception as exc:  # the server still starts; the workers' sweepers will try again
        print(f"lowbit: could not check the queue for unpublished jobs ({type(exc).__name__}: {exc})",
              file=sys.stderr)
    finally:
        engine.dispose()


def _parse_option(text: str) -> tuple[str, Any]:
    """The client's --option parser, its refusal turned into this command's exit message."""

    try:
        return parse_option(text)
    except LowbitClientError as exc:
        raise SystemExit(exc.message) from exc


def _user_path(text: str | None) -> Path | None:
    """A path the user typed, made absolute now: the engine runs in a private working directory."""
    return Path(os.path.abspath(os.path.expanduser(text))) if text else None


def _input_problem(flag: str, path: Path | None) -> str | None:
    if path is None or path.is_file():
        return None
    return f"{flag} {path}: " + ("is a folder, not a file" if path.is_dir() else "no such file")


@contextlib.contextmanager
def _private_scratch() -> Iterator[Path]:
    """Run the engine with a private, fresh folder as its working directory and temp folder, removed afterwards.

    ONNX Runtime writes some files relative to the working directory (symbolic shape inference that stops early
    saves sym_shape_infer_temp.onnx and a <uuid1>.data file as large as the model's weights), and its quantizer
    writes model copies to the temp folder: none of it may land in the user's folder or stay in /tmp."""
    scratch = Path(tempfile.mkdtemp(prefix="lowbit-quantize-"))
    cwd, tempdir, tmpdir_env = os.getcwd(), tempfile.tempdir, os.environ.get("TMPDIR")
    os.chdir(scratch)
    tempfile.tempdir = str(scratch)
    os.environ["TMPDIR"] = str(scratch)  # for the child processes the engine starts (the .pt2 export)
    try:
        yield scratch
    finally:
        os.chdir(cwd)
        tempfile.tempdir = tempdir
        if tmpdir_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = tmpdir_env
        shutil.rmtree(scratch, ignore_errors=True)


def _path_problems(model: Path, calib: Path | None, evalset: Path | None, output: Path,
                   report_path: Path | None) -> list[str]:
    """What is wrong with ``lowbit quantize``'s paths, each in words (empty: nothing)."""
    problems = [p for p in (_input_problem("model", model), _input_problem("--calib", calib),
                            _input_problem("--eval", evalset)) if p]
    for flag, dest in (("-o", output), ("--report", report_path)):
        if dest is not None and not dest.parent.is_dir():
            problems.append(f"{flag} {dest}: the folder {dest.parent} does not exist")
    return problems


def cmd_quantize(args: argparse.Namespace) -> int:
    # Before anything imports ONNX Runtime, whose telemetry otherwise writes $TMPDIR/.ses when it is imported.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # lazy: the engine (onnx, ONNX Runtime) loads only for this command, after main() set ORT_DISABLE_TELEMETRY
    from worker.engine.config import QuantizeConfig, parse_options
    from worker.engine.errors import EngineError

    model, calib, evalset = _user_path(args.model), _user_path(args.calib), _user_path(args.eval)
    output, report_path = _user_path(args.output), _user_path(args.report)
    assert model is not None and output is not None  # required arguments
    problems = _path_problems(model, calib, evalset, output, report_path)
    if problems:
        print(f"lowbit: error [invalid_path]: {'; '.join(problems)}", file=sys.stderr)
        return 2
    raw: dict[str, Any] = {}
    recipe = args.recipe
    if args.config:
        # A configuration exported by the service (GET /api/v1/jobs/ID/config): its recipe and options exactly.
        try:
            conf = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            print(f"error [invalid_config]: cannot read {args.config} as JSON ({exc})", file=sys.stderr)
            return 2
        if not isinstance(conf, dict) or not isinstance(conf.get("recipe"), str) or \
                not isinstance(conf.get("options", {}), dict):
            print(f"error [invalid_config]: {args.config} must hold {{\"recipe\": ..., \"options\": {{...}}}}",
                  file=sys.stderr)
            return 2
        recipe = recipe or conf["recipe"]
        raw.update(conf.get("options") or {})
    recipe = recipe or "int8_static"
    raw.update(dict(_parse_option(o) for o in args.option or []))
    if args.method:
        raw["method"] = args.method
    try:
        target = accuracy_target(args.accuracy_target)
    except ValueError as exc:  # an --accuracy-target that is not JSON, or not a target
        print(f"\nlowbit: error [invalid_accuracy_target]: {exc}", file=sys.stderr)
        return 2
    # (A ValueError from the run itself is no target's fault: it goes to main's internal-error handler.)
    try:
        with _private_scratch() as scratch:
            cfg = QuantizeConfig(
                model_path=model,
                output_path=output,
                recipe=recipe,
                options=parse_options(recipe, raw),
                calibration_path=calib,
                eval_path=evalset,
                work_dir=scratch / "work",
                threads=args.threads,
                device=args.device,
                cache_dir=_user_path(args.cache_dir),
                # auto searches for it (its own argument); every other recipe reports against it.
                accuracy_target=target if recipe != "auto" else None,
            )
            report = _quantize(cfg, recipe, target, report_path)
        if report is None:
            return 1
    except EngineError as exc:
        print(f"\nlowbit: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if report_path:
        report_path.write_text(json.dumps(report, indent=2))
    # The report as the engine checked it (report_check), read as its JSON (ReportSections, as the client reads
    # it): reading it through the typed model would load pydantic after the job, about 8 MB over a small
    # model's whole job.
    sections = ReportSections.of(report)
    size = sections.size
    print(f"wrote {cfg.output_path} ({size['quantized_bytes']} bytes, {size['ratio']:.3f} of "
          f"{size['original_bytes']})")
    print_figures(report)
    for w in sections.warnings:
        print(f"  warning: {w}")
    return 0


def print_figures(body: dict[str, Any]) -> None:
    """The offline run's figures, with the 95% intervals the report has, as the client's summary writes them:
    each output, label accuracy and its change, latency and its speed-up. ``body``: the report's JSON form
    (as written, or as GET /report serves it)."""
    sections = ReportSections.of(body)
    acc, lat = sections.accuracy, sections.latency
    for o in acc.get("outputs") or []:
        print(output_line(o))
    lab = acc.get("labels")
    if lab:
        print(f"  label accuracy {lab['original'] * 100:.2f} % -> {lab['quantized'] * 100:.2f} %  "
              f"{lab['delta'] * 100:+.2f} pt" + ci_text(lab.get("delta_ci"), lambda x: signed_end(x * 100)))
    if lat:
        runs = f", {lat['runs']} runs" if lat.get("runs") else ""
        change = latency_change(lat) or "speed-up not measured"
        print(f"  latency p50 {lat['original_ms_p50']:.4g} ms -> {lat['quantized_ms_p50']:.4g} ms on "
              f"{lat['provider']}: {change}{runs}")


def accuracy_target(text: str | None) -> dict[str, Any] | None:
    """``--accuracy-target``, checked as the API checks a job's (app.jobs.schemas.AccuracyTarget) and stored as it
    stores it (unset keys left out), so that the report's accuracy_target is the same as a service job's.
    Raises ValueError (pydantic's ValidationError is one) for text that is not JSON or not a target."""
    if not text:
        return None
    # lazy: keeps `import app.cli` light (the CLI's fast start) (pydantic, the API's schemas)
    from app.jobs.schemas import AccuracyTarget

    target: dict[str, Any] = AccuracyTarget.model_validate(json.loads(text)).model_dump(exclude_none=True)
    return target


def _quantize(cfg: Any, recipe: str, target: dict[str, Any] | None,
              report_path: Path | None) -> dict[str, Any] | None:
    """Run the engine (or the auto search) in-process; the report, or None when auto met no target."""
    # lazy: the engine (onnx, ONNX Runtime) loads only for this command, after main() set ORT_DISABLE_TELEMETRY
    from worker.engine.pipeline import run

    def progress(stage: str, fraction: float) -> None:
        if sys.stderr.isatty():
            print(f"\r{stage:<12} {fraction * 100:5.1f}%", end="", file=sys.stderr, flush=True)

    if recipe != "auto":
        report: dict[str, Any] = run(cfg, progress).report
        return report
    # lazy: the engine (onnx, ONNX Runtime) loads only for this command, after main() set ORT_DISABLE_TELEMETRY
    from worker.engine import auto
    from worker.engine.labels import candidate_name
    from worker.engine.target import check_target

    target = check_target(target)
    # lazy: keeps `import app.cli` light (the CLI's fast start)
    from worker.engine.report import Figures, Report

    outcome = auto.search(cfg, target)
    report = outcome.report
    typed = Report.model_validate(report)
    for c in typed.candidates or []:
        name = candidate_name(c.recipe, c.options, c.excluded_nodes, c.activations_16bit, c.blocks)
        speed = f", speed-up {c.speedup}" if c.speedup is not None else ""
        print(f"  candidate {name}: {c.status}, {c.size_bytes} bytes, {target['metric']} {c.metric}, "
              f"met {c.met_target}{speed}")
    if outcome.chosen is None:
        if report_path:
            report_path.write_text(json.dumps(report, indent=2))
        code, message = auto.failure(outcome, target)
        print(f"lowbit: error [{code}]: {message}", file=sys.stderr)
        return None
    assert typed.chosen is not None  # outcome.chosen is set: the report names it
    print(f"chosen: {json.dumps(typed.chosen.model_dump(mode='json'))}")
    # The figure the choice was made on, and the one on samples the search never saw (the reported one).
    section = typed.auto
    assert section is not None  # every auto report has it
    for name, part in (("selection", section.selection), ("confirmation", section.confirmation)):
        if isinstance(part, Figures):  # not a confirmation that failed to run
            print(f"  {name}: {target['metric']} {part.target.value} on {part.samples} samples, "
                  f"met {part.target.met}")
    if section.confirmation is None:
        print("  confirmation: none (too few evaluation samples to hold some out; see the warning)")
    return report


def cmd_keys(args: argparse.Namespace) -> int:
    # lazy: keeps `import app.cli` light (the CLI's fast start) (sqlalchemy, the tables)
    from app.db import make_engine, make_sessionmaker
    from app.errors import LowbitError
    from app.migrate import upgrade
    from app.tenants import service as tenants

    s = _settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.resolved_database_url)
    engine = make_engine(s.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            if args.keys_command == "create":
                tenant, key = tenants.create_key(db, args.tenant, max_active_jobs=args.max_active_jobs,
                                                 uploads_per_minute=args.uploads_per_minute,
                                                 storage_quota_bytes=args.storage_quota_bytes)
                db.commit()
                print(key)
                print(f"new key for tenant '{tenant.name}'; it is shown only this once: keep it secret, send it as "
                      "'Authorization: Bearer <key>' (or LOWBIT_API_KEY for the lowbit client)", file=sys.stderr)
            elif args.keys_command == "list":
                for key_row, tenant in tenants.list_keys(db):
                    state = f"revoked {key_row.revoked_at:%Y-%m-%d %H:%M}" if key_row.revoked_at else "active"
                    print(f"lb_{key_row.prefix}_...  {tenant.name:<20} {key_row.created_at:%Y-%m-%d %H:%M}  {state}")
            else:
                key_row = tenants.revoke_key(db, args.prefix)
                db.commit()
                print(f"revoked lb_{key_row.prefix}_...", file=sys.stderr)
    except LowbitError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


def cmd_webhook_secret(_: argparse.Namespace) -> int:
    # lazy: keeps `import app.cli` light (the CLI's fast start) (sqlalchemy, the tables)
    from app.webhooks import webhook_secret

    print(webhook_secret(_settings()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize ML models as jobs.")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run the API (with an embedded worker by default)")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--no-worker", action="store_true", help="do not start the embedded worker process")
    sp.add_argument("--no-migrate", action="store_true", help="do not upgrade the database on start")
    sp.add_argument("--queues", help="queues of the embedded worker (default cpu,gpu)")
    sp.add_argument("--workers", type=int, default=1,
                    help="embedded worker processes (default 1); each is restarted if it dies")
    sp.set_defaults(func=cmd_serve)

    wp = sub.add_parser("worker", help="run a Celery worker")
    wp.add_argument("--queues", help="comma-separated queues (default LOWBIT_WORKER_QUEUES or 'cpu')")
    wp.add_argument("--memory-gb", type=float, default=None,
                    help="memory this worker offers jobs, for routing large ones (default LOWBIT_WORKER_MEMORY_GB, "
                    "else the machine's total)")
    wp.add_argument("--concurrency", type=int)
    wp.add_argument("--loglevel", default="INFO")
    wp.set_defaults(func=cmd_worker)

    hp = sub.add_parser("worker-health", help="exit 0 if a worker on this host has a live heartbeat (for a "
                        "container's health check), else 1")
    hp.set_defaults(func=cmd_worker_health)

    kp = sub.add_parser("keys", help="create, list or revoke tenants' API keys (on the server)")
    ksub = kp.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="print a new key for a tenant (created if new); shown once")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--max-active-jobs", type=int, help="jobs queued or running at once (default: server's)")
    kc.add_argument("--uploads-per-minute", type=int, help="model and dataset uploads a minute (default: server's)")
    kc.add_argument("--storage-quota-bytes", type=int, help="bytes of uploads and artifacts the tenant may keep, 0 for "
                    "no limit (default: LOWBIT_TENANT_STORAGE_QUOTA_BYTES)")
    ksub.add_parser("list", help="list keys (prefix, tenant, created, state); the keys themselves are not kept")
    kr = ksub.add_parser("revoke", help="revoke a key by its prefix (lb_<prefix>)")
    kr.add_argument("prefix")
    kp.set_defaults(func=cmd_keys)

    gp = sub.add_parser("gc", help="remove finished jobs' files older than LOWBIT_RETENTION_DAYS, and stray files, "
                        "now (workers do it every LOWBIT_GC_INTERVAL_S)")
    gp.add_argument("--retention-days", type=float, help="this retention instead of LOWBIT_RETENTION_DAYS")
    gp.set_defaults(func=cmd_gc)

    mp = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    mp.set_defaults(func=cmd_migrate)


    # Recipe choices and their options come from the registry (worker/engine/recipes).
    qp = sub.add_parser("quantize", help="quantize a model offline, without the service",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="recipes:\n" + describe_recipes())
    qp.add_argument("model", help="ONNX model file")
    qp.add_argument("--calib", help="calibration .npz")
    qp.add_argument("--eval", help="evaluation .npz (labels optional)")
    qp.add_argument("--recipe", choices=list(REGISTRY),
                    help="default: the --config file's recipe, else int8_static")
    qp.add_argument("--config", help="a JSON file {\"recipe\", \"options\"}, e.g. an auto job's chosen configuration "
                    "(GET /api/v1/jobs/ID/config); --option and --method override its options")
    qp.add_argument("--accuracy-target", help="JSON {\"metric\": ..., \"min\" or \"max_drop\": ...}: recipe auto "
                    "searches for it; other recipes report whether they meet it (report.accuracy_target)")
    qp.add_argument("--method", choices=list(CALIBRATION_METHODS))
    qp.add_argument("--option", action="append", help="recipe option KEY=VALUE (JSON value), repeatable")
    qp.add_argument("-o", "--output", required=True, help="where to write the quantized model")
    qp.add_argument("--report", help="where to write the report JSON")
    qp.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    qp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    qp.add_argument("--cache-dir", help="cache calibration statistics here and reuse them across runs")
    qp.set_defaults(func=cmd_quantize)

    wh = sub.add_parser("webhook-secret", help="print the secret that signs this server's webhooks "
                        "(LOWBIT_WEBHOOK_SECRET, or the one generated in the data directory)")
    wh.set_defaults(func=cmd_webhook_secret)

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Every ``lowbit`` command. Whatever goes wrong ends as one ``lowbit: error [CODE]: ...`` line on stderr and a
    non-zero exit status, never a Python traceback (LOWBIT_DEBUG=1 prints it too)."""

    # Before anything imports ONNX Runtime, in this process or the workers it starts: its telemetry otherwise
    # writes $TMPDIR/.ses and ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ (a device id and a database)
    # when a session is made, outside the data directory.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\nlowbit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lowbit ... | head`: the reader is gone, and that is fine
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if _database_unreachable(exc):
            if os.environ.get("LOWBIT_DEBUG"):
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            print(f"lowbit: error [database_unavailable]: cannot reach the database ({first}); check "
                  "LOWBIT_DATABASE_URL and that the database server is up", file=sys.stderr)
            return EXIT_UNREACHABLE
        internal_error(exc)
        return EXIT_INTERNAL


def _database_unreachable(exc: BaseException) -> bool:
    if "sqlalchemy" not in sys.modules:  # not loaded: not a database error (and no need to import it here)
        return False
    # lazy: loaded already when the error came from it (checked above)
    import sqlalchemy as sa

    return isinstance(exc, sa.exc.OperationalError)


if __name__ == "__main__":
    sys.exit(main())
