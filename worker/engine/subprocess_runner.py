"""The one way lowbit runs code in a child process: a job's engine (``worker.sandbox``) and PyTorch on a
``.pt2`` upload (``worker.engine.pt2``, from the API, the CLI or inside a job's engine child) both go through
``run`` here.

The child is started fresh (``python -m worker.engine.subprocess_runner``), never forked: the worker holds
database connections and threads that a fork would copy in a broken state. It gets an environment
allow-list only (no database URL, no webhook secret: untrusted files are parsed there) and its own session,
so that killing its process group also kills whatever it started. Before it imports anything heavy the
child caps its own address space (RLIMIT_AS), CPU time (RLIMIT_CPU) and file size (RLIMIT_FSIZE), turns core
dumps off and asks the kernel to kill it when its parent dies (a killed worker leaves no orphan burning CPU).
The parent enforces the wall clock. A model that segfaults, hangs or balloons then ends its own run with a
specific error code, and the parent lives on.

Parent and child talk over a pair of pipes: the request goes down pickled (the parent is trusted); progress
events, then exactly one outcome, come back as size-bounded JSON, never pickles, so that a child that an
untrusted file has taken over cannot run code in the parent through what it sends back. A child that ends
without an outcome is described by how it ended (signal, exit status, CPU and peak memory, and the tail of
its output when that went to a log file).

This module imports nothing heavy (the API imports it through ``worker.engine.pt2``), and nothing of the
worker's service modules (the engine is a library).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from worker.engine.errors import EngineError
from worker.engine.files import temp_in

# How often the parent wakes up without news from the child, to run ``tick`` (cancel checks, heartbeats).
TICK_S = 0.25
# Progress events the child forwards at most this often per kind (the parent rate-limits database writes).
EVENT_INTERVAL_S = 0.2
# Environment variables a child keeps; everything else (database URL, webhook secret, ...) stays behind.
KEEP_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "VIRTUAL_ENV",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONPATH")
# ONNX Runtime's telemetry (1.32 on Linux) writes a session file, $TMPDIR/.ses, as soon as it is imported: off.
ORT_TELEMETRY_OFF = "1"
# The largest message the parent accepts from the child (a report is a few MB at most).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Substrings of allocator failures as ONNX Runtime, numpy and C++ report them.
_OOM_MARKERS = ("bad_alloc", "failed to allocate", "out of memory", "unable to allocate", "cannot allocate",
                "memoryerror")
# How much of a child's log explains its death: its last few non-empty lines, at most this many characters.
LOG_TAIL_CHARS = 600

Emit = Callable[[Any], None]


@dataclass(frozen=True)
class Limits:
    """0 turns a limit off (a child then keeps what it inherited: a .pt2 child started inside a job's engine
    child is held by the job's limits)."""

    memory_mb: int = 0
    cpu_s: int = 0
    timeout_s: float = 0.0
    # The largest file the child may write (RLIMIT_FSIZE): a write past it fails (EFBIG) and the run with
    # disk_full, like a full disk (ENOSPC), instead of filling the disk.
    file_mb: int = 0


@dataclass(frozen=True)
class Spawn:
    """How a child is started, beyond the allow-listed environment. A spare child is kept per ``Spawn``."""

    preload: tuple[str, ...] = ()
    # Set on top of the allow-list (e.g. a thread count): never secrets.
    env: tuple[tuple[str, str], ...] = ()
    # Where the child's stdout and stderr go (its tail then explains a death); None: the parent's.
    log: Path | None = None


@dataclass(frozen=True)
class Ended:
    """How a child ended without sending an outcome."""

    status: int  # as os.wait4 returns it
    usage: Any  # resource.struct_rusage, or None when it was reaped elsewhere
    limits: Limits
    log_tail: str

    @property
    def returncode(self) -> int:
        """As subprocess reports it: the exit status, or minus the signal that ended the child."""
        return os.waitstatus_to_exitcode(self.status)


class ChildFailed(Exception):
    """The child raised something that is not an EngineError (a bug, or an environment problem)."""

    def __init__(self, type_name: str, message: str, trace: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message, self.trace = type_name, message, trace


def project_root() -> str:
    """The folder holding the ``worker`` package: the child imports it from there whatever its cwd."""
    return str(Path(__file__).resolve().parents[2])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: the allow-list, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k in KEEP_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root(), os.getcwd(), env.get("PYTHONPATH", "")) if p)
    # glibc reserves 64 MB of address space per thread arena; with a few ONNX Runtime threads that alone would
    # eat an address-space limit, so the limit would no longer say how much memory the model may use.
    env["MALLOC_ARENA_MAX"] = "2"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["ORT_DISABLE_TELEMETRY"] = ORT_TELEMETRY_OFF
    env.update(extra or {})
    return env


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    down: Connection
    up: Connection
    spawn: Spawn


# One idle child per Spawn, started while the previous run ran: importing the engine (numpy, onnx, ONNX
# Runtime, and torch, which ONNX Runtime's shape inference imports) takes seconds that would otherwise be paid
# at the start of every job.
_spares: dict[Spawn, _Child] = {}
_spares_lock = threading.Lock()


def spare_pids() -> dict[tuple[str, ...], int]:
    """The idle spare children's pids by preload list (for tests and diagnostics)."""
    with _spares_lock:
        return {spawn.preload: child.proc.pid for spawn, child in _spares.items()}


def _start(spawn: Spawn) -> _Child:
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    log = open(spawn.log, "ab") if spawn.log is not None else None  # noqa: SIM115 (closed below, the child keeps it)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.engine.subprocess_runner", str(down_r), str(up_w), str(os.getpid()),
             *spawn.preload],
            pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=child_env(dict(spawn.env)), start_new_session=True,
        )
    finally:
        os.close(down_r)
        os.close(up_w)
        if log is not None:
            log.close()
    return _Child(proc, Connection(down_w, readable=False), Connection(up_r, writable=False), spawn)


def _take(spawn: Spawn) -> _Child:
    """A child for this run: the waiting spare if it is still alive, else a new one."""
    with _spares_lock:
        child = _spares.pop(spawn, None)
    if child is not None and child.proc.poll() is not None:
        _discard(child)
        child = None
    return child or _start(spawn)


def _keep_spare(spawn: Spawn) -> None:
    """Start the next run's child now, between runs, so that it does not compete with this one for CPU."""
    with _spares_lock:
        if spawn not in _spares:
            _spares[spawn] = _start(spawn)


def _discard(child: _Child) -> None:
    child.down.close()
    child.up.close()
    kill(child.proc)


def drop_spares() -> None:
    """Stop the idle children (a worker shutting down, or a test that counts processes)."""
    with _spares_lock:
        while _spares:
            _discard(_spares.popitem()[1])


def job_timeout(limits: Limits) -> EngineError:
    """The error of a run past its wall clock, unless the caller names its own (``run``'s ``timed_out``)."""
    return EngineError(
        "job_timeout",
        f"the job did not finish within {limits.timeout_s:g} s (LOWBIT_JOB_TIMEOUT_S) and was stopped; "
        "the model may be too large or loop for a very long time: try fewer samples "
        "(max_calibration_samples, latency_runs) or a smaller model",
    )


def run(target: str, payload: Any, limits: Limits, on_event: Emit | None = None,
        tick: Callable[[], None] | None = None, on_start: Callable[[int], None] | None = None,
        preload: tuple[str, ...] = (), spare: bool = False, *, spawn: Spawn | None = None,
        work_dir: Path | None = None, timed_out: Callable[[Limits], EngineError] = job_timeout,
        ended: Callable[[Ended], EngineError] | None = None, event_interval_s: float = EVENT_INTERVAL_S) -> Any:
    """Call ``target`` ("module:function", called as ``function(payload, emit)``) in a limited child process
    and return its result. An EngineError raised there is raised here; a crash, a limit or the timeout
    becomes an EngineError with its own code (``timed_out`` and ``ended`` word those for callers with codes of
    their own; ``ended`` defaults to ``death``). ``on_event`` receives what the child emits; ``tick`` runs
    every TICK_S or so. Either may raise (e.g. JobCancelled): the child is killed at once and the exception
    propagates. ``on_start`` gets the child's pid. The child imports the ``preload`` modules ("module:function"
    also calls the function) before it is given the work; with ``spare``, a preloaded child waits for the next
    call. ``spawn`` overrides ``preload`` with the whole start-up; ``work_dir`` is the child's scratch folder
    (else the payload's).
    The child forwards events of one kind at most every ``event_interval_s`` (0: all of them)."""
    spawn = spawn or Spawn(preload=tuple(preload))
    child = _take(spawn)
    payload = absolute_paths(payload)
    request = (target, payload, limits, str(os.path.abspath(work_dir)) if work_dir is not None else None,
               event_interval_s)
    try:
        child.down.send(request)
    except OSError:  # the spare died after all (its parent thread ended): a fresh child
        _discard(child)
        child = _start(spawn)
        child.down.send(request)
    if on_start is not None:
        on_start(child.proc.pid)
    started = time.monotonic()
    deadline = started + limits.timeout_s if limits.timeout_s else None
    try:
        outcome = _follow(child, limits, deadline, on_event, tick, timed_out)
    except BaseException:
        kill(child.proc)
        raise
    finally:
        child.down.close()
        child.up.close()
    reaped = _reap(child.proc, deadline)
    if reaped is None:  # it closed its pipe but lives on past the wall clock
        kill(child.proc)
        if outcome is None:
            raise timed_out(limits)
    if spare:
        _keep_spare(spawn)
    if outcome is not None:
        return _result(outcome)
    status, usage = reaped or (0, None)
    end = Ended(status, usage, limits, log_tail(spawn.log) if spawn.log is not None else "")
    raise (ended or death)(end)


def _follow(child: _Child, limits: Limits, deadline: float | None, on_event: Emit | None,
            tick: Callable[[], None] | None, timed_out: Callable[[Limits], EngineError]) -> tuple[Any, ...] | None:
    """Hand the child's events to ``on_event`` until its outcome comes (returned), or its pipe closes (None)."""
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise timed_out(limits)
        if wait([child.up], timeout=TICK_S):
            try:
                msg = _decode(child.up.recv_bytes(MAX_MESSAGE_BYTES))
            except (EOFError, OSError):
                return None  # the child is gone without an outcome: the caller sees how it ended
            except ValueError as exc:  # not our protocol: a broken or subverted child
                raise EngineError("engine_crashed", "the process quantizing the model sent back something "
                                  "that is not a result; the model may be damaged: check that it runs in "
                                  "ONNX Runtime, then submit it again") from exc
            if msg[0] != "event":
                return tuple(msg)
            if on_event is not None:
                on_event(tuple(msg[1]) if isinstance(msg[1], list) else msg[1])
        if tick is not None:
            tick()


def _result(outcome: tuple[Any, ...]) -> Any:
    kind = outcome[0]
    if kind == "ok":
        return outcome[1]
    if kind == "error":
        raise EngineError(outcome[1], outcome[2])
    raise ChildFailed(outcome[1], outcome[2], outcome[3])


def _decode(raw: bytes) -> list[Any]:
    msg = json.loads(raw)
    if not isinstance(msg, list) or not msg or msg[0] not in ("event", "ok", "error", "failed"):
        raise ValueError("unexpected message")
    return msg


def _jsonable(obj: Any) -> Any:
    """What the child's results hold besides JSON types: paths, dataclasses, numpy scalars and arrays."""
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot send a {type(obj).__name__} back to the worker")


def _send(up: Connection, msg: tuple[Any, ...]) -> None:
    up.send_bytes(json.dumps(msg, default=_jsonable).encode())


def _reap(proc: subprocess.Popen[bytes], deadline: float | None = None) -> tuple[int, Any] | None:
    """Wait for the child (until ``deadline``, a time.monotonic(), if given: None when it passes); its exit
    status and resource usage (CPU seconds, peak memory)."""
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
        except ChildProcessError:  # already reaped (e.g. by Popen)
            return (proc.returncode or 0) << 8, None
        except InterruptedError:
            continue
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child and everything it started (its own session), and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    _reap(proc)


def log_tail(path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    """The last few non-empty lines of a child's log, on one line."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-4:])[-limit:]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def death(end: Ended) -> EngineError:
    """Why an engine child ended without an outcome, as an error the user can act on."""
    status, usage, limits = end.status, end.usage, end.limits
    cpu = (usage.ru_utime + usage.ru_stime) if usage is not None else 0.0
    peak_mb = usage.ru_maxrss / 1024 if usage is not None else 0.0
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU or (limits.cpu_s and sig == signal.SIGKILL and cpu >= limits.cpu_s):
            return EngineError(
                "cpu_time_exceeded",
                f"the job used more than its {limits.cpu_s} s of CPU time (LOWBIT_JOB_CPU_LIMIT_S) and was stopped; "
                "the model may loop for a very long time, or need fewer samples (max_calibration_samples, "
                "latency_runs) to fit",
            )
        if sig == signal.SIGXFSZ:  # a process the engine started, past the file-size limit
            return disk_full(OSError(errno.EFBIG, "File too large"), limits) or EngineError("disk_full", "")
        if sig == signal.SIGKILL:
            return EngineError(
                "engine_crashed",
                f"the process quantizing the model was killed (SIGKILL) at {peak_mb:.0f} MB peak memory, most often "
                "by the system's out-of-memory killer; try a smaller model or fewer samples, or submit it again",
            )
        return EngineError(
            "engine_crashed",
            f"the model crashed the process quantizing it ({_signal_name(sig)}); the file may be damaged or use "
            "an operator the runtime cannot handle: check that it runs in ONNX Runtime, then submit it again",
        )
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    return EngineError(
        "engine_crashed",
        f"the process quantizing the model exited with status {code} without a result; check that the model "
        "runs in ONNX Runtime, then submit it again",
    )


def out_of_memory(limits: Limits) -> EngineError:
    return EngineError(
        "out_of_memory",
        f"the job needed more than its {limits.memory_mb} MB of memory (LOWBIT_JOB_MEMORY_LIMIT_MB) and was "
        "stopped; the model may ask for huge tensors, or the batch may be too big: try a smaller batch_size "
        "or a smaller model",
    )


# errno values and messages of a write that found no room: a full disk or quota, or the file-size limit.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_MARKERS = ("no space left on device", "disk quota exceeded", "file too large")


def disk_full(exc: BaseException, limits: Limits) -> EngineError | None:
    """The job's error if ``exc`` (or what caused it) is a write that found no room, else None. Libraries wrap
    the OSError (ONNX Runtime and protobuf raise their own types with the OS message), so the text counts too."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        text = str(seen).lower()
        code = seen.errno if isinstance(seen, OSError) else None
        if code in _DISK_ERRNOS or any(m in text for m in _DISK_MARKERS):
            if code == errno.EFBIG or "file too large" in text:
                return EngineError(
                    "disk_full",
                    f"a file the job wrote grew past the {limits.file_mb} MB a job may write "
                    "(LOWBIT_JOB_FILE_LIMIT_MB) and the job was stopped; nothing of it was kept: try a smaller model, "
                    "or ask for a higher limit" if limits.file_mb else
                    "a file the job wrote grew past the largest file this system allows; nothing of it was kept")
            return EngineError(
                "disk_full",
                "the disk ran out of space while the job wrote its files (No space left on device); nothing of it "
                "was kept: free space where the server keeps its data (LOWBIT_DATA_DIR), or shorten the retention "
                "of old jobs' files (LOWBIT_RETENTION_DAYS, lowbit gc), then submit the job again")
        seen = seen.__cause__ or seen.__context__
    return None


def absolute_paths(payload: Any) -> Any:
    """``payload`` with every relative Path field (of a dataclass payload) made absolute against this process's
    working directory: the child runs in another one, and the worker's data directory may be relative."""
    if not dataclasses.is_dataclass(payload) or isinstance(payload, type):
        return payload
    changes = {f.name: Path(os.path.abspath(v)) for f in dataclasses.fields(payload)
               if isinstance(v := getattr(payload, f.name), Path) and not v.is_absolute()}
    return dataclasses.replace(payload, **changes) if changes else payload


# ---- the child side ----------------------------------------------------------------------------------------


def prctl(option: int, arg: Any) -> None:
    """Linux prctl(2); a no-op where it is missing."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg)


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the process that started it dies (a SIGKILLed one cannot clean up)."""
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _name(name: bytes) -> None:
    """What ps and /proc/PID/comm show: ``lowbit-spare`` while waiting, ``lowbit-job`` once given work."""
    prctl(15, name)  # PR_SET_NAME


def _set_limit(which: int, size: int) -> None:
    """Lower a limit to ``size``, never above the hard limit this process inherited (a child started inside a
    limited child may not raise it, and a lower inherited one is the stricter of the two anyway)."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        size = min(size, hard)
    resource.setrlimit(which, (size, size))


def _apply(limits: Limits) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashing model must not fill the disk with cores
    if limits.memory_mb:
        _set_limit(resource.RLIMIT_AS, int(limits.memory_mb) * 1024 * 1024)
    if limits.cpu_s:
        # RLIMIT_CPU counts from the process's start: the job's budget starts after the preloaded imports.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(usage.ru_utime + usage.ru_stime) + 1 + int(limits.cpu_s)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        # The soft limit sends SIGXCPU (default: terminate); the hard one, a little later, SIGKILL.
        cap = hard if hard != resource.RLIM_INFINITY else soft + 5
        resource.setrlimit(resource.RLIMIT_CPU, (min(soft, cap), min(soft + 5, cap)))
    if limits.file_mb:
        # A write past the limit then fails with EFBIG (reported as disk_full) instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        _set_limit(resource.RLIMIT_FSIZE, int(limits.file_mb) * 1024 * 1024)


def _looks_like_oom(text: str) -> bool:
    low = text.lower()
    return any(m in low for m in _OOM_MARKERS)


def _event_key(event: Any) -> str:
    """What events are rate-limited by: an engine stage (``(stage, fraction)``) or a .pt2 event's kind."""
    if isinstance(event, tuple) and event:
        return str(event[0])
    if isinstance(event, dict):
        return str(event.get("event", ""))
    return ""


def _outcome(target: str, payload: Any, limits: Limits, emit: Emit) -> tuple[Any, ...]:
    """Call the target; its result or error as the message the parent gets."""
    try:
        module, _, name = target.partition(":")
        return ("ok", getattr(importlib.import_module(module), name)(payload, emit))
    except MemoryError:
        return ("error", *_as_pair(out_of_memory(limits)))
    except EngineError as exc:
        if limits.memory_mb and _looks_like_oom(exc.message):
            exc = out_of_memory(limits)
        return ("error", *_as_pair(disk_full(exc, limits) or exc))
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        full = disk_full(exc, limits)
        if full is not None:
            return ("error", *_as_pair(full))
        if limits.memory_mb and _looks_like_oom(text):
            return ("error", *_as_pair(out_of_memory(limits)))
        return ("failed", type(exc).__name__, str(exc)[:2000], traceback.format_exc()[-4000:])


def child_main(read_fd: int, write_fd: int, parent: int, preload: list[str]) -> None:
    down, up = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    _die_with_parent(parent)
    _name(b"lowbit-spare")
    for entry in preload:  # "package.module", or "package.module:function" to call after the import
        module, _, function = entry.partition(":")
        with contextlib.suppress(Exception):  # only a head start: the run imports what it needs anyway
            loaded = importlib.import_module(module)
            if function:
                getattr(loaded, function)()
    try:
        target, payload, limits, work_dir, interval = down.recv()
    except EOFError:  # a spare that was never used
        return
    _name(b"lowbit-job")
    down.close()
    _apply(limits)
    owned = _enter_scratch(payload, work_dir)
    last: dict[str, float] = {}

    def emit(event: Any) -> None:
        # Rate-limited per event key: the parent only needs the latest, every so often.
        key = _event_key(event)
        final = isinstance(event, tuple) and len(event) > 1 and isinstance(event[1], float) and event[1] >= 1.0
        now = time.monotonic()
        if key in last and now - last[key] < interval and not final:
            return
        last[key] = now
        _send(up, ("event", event))

    outcome = _outcome(target, payload, limits, emit)
    try:
        _send(up, outcome)
    except MemoryError:  # encoding a large result under the limit
        _send(up, ("error", *_as_pair(out_of_memory(limits))))
    except TypeError as exc:  # a result that cannot travel: a bug of ours
        _send(up, ("failed", "TypeError", str(exc), traceback.format_exc()[-4000:]))
    up.close()
    if owned is not None:
        os.chdir(owned.parent)
        shutil.rmtree(owned, ignore_errors=True)


def _as_pair(exc: EngineError) -> tuple[str, str]:
    return exc.code, exc.message


def _enter_scratch(payload: Any, work_dir: str | None) -> Path | None:
    """Make the run's scratch folder this child's working directory and temp folder: ``work_dir/tmp`` (the
    one ``run`` was given, else the payload's work folder), else a private temporary folder (returned, for
    removal at the end).

    ONNX Runtime writes some files relative to the working directory: symbolic shape inference that stops
    early saves ``sym_shape_infer_temp.onnx`` and a ``<uuid1>.data`` file as large as the model's weights
    there, on every such job. In the work folder they go with it; in the worker's directory they piled up."""
    folder = work_dir if work_dir is not None else getattr(payload, "work_dir", None)
    scratch = temp_in(Path(folder)) if isinstance(folder, str | Path) else None
    owned = None
    if scratch is None:
        owned = scratch = Path(tempfile.mkdtemp(prefix="lowbit-job-"))
        tempfile.tempdir = str(owned)
        os.environ["TMPDIR"] = str(owned)
    os.chdir(scratch)
    return owned


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
