"""`lowbit serve`'s embedded workers: started with the server, watched, restarted when one dies, stopped with it.

A worker's main process can die without a word (the kernel's OOM killer sends SIGKILL): its pool processes are
orphaned and the job it ran stays 'running' with nobody to finish it, and nothing else would start a worker.
The supervisor:
- is the workers' "subreaper" (PR_SET_CHILD_SUBREAPER), so a dead worker's orphans become its children: it kills
  and reaps them (their sandbox children die with them), leaving no process behind;
- then hands the jobs of processes that are gone back to the queue at once (``on_lost``; the next attempt takes
  over, as after a pool-process kill), and restarts the worker after a backoff (1 s, doubling up to 60 s while
  workers keep dying within STABLE_S of their start), counting restarts for /metrics;
- on stop, sends each worker SIGTERM (a worker hands its running job back to the queue and exits), kills what
  is left after ``timeout`` and reaps it.
With ``sweep`` (the embedded mode, where this server's workers are the only ones on its data directory), it also
hands back, every SWEEP_S, the jobs of any process that is gone: a pool process killed inside a live worker,
whose message the filesystem broker cannot redeliver, would otherwise wait for the lease.
Each worker sets itself to receive SIGTERM when the server dies (``LOWBIT_SUPERVISOR_PID``, see
``worker/tasks.py``), so a server killed outright does not leave its workers running either.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.procs import children

# A worker that ran this long before it died was healthy: the next restart waits the shortest delay again.
STABLE_S = 30.0
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0
POLL_S = 0.25
# How often ``sweep`` looks for running jobs whose process died inside a live worker (a pool process killed).
SWEEP_S = 2.0
PR_SET_CHILD_SUBREAPER = 36


def _say(text: str) -> None:
    print(f"lowbit: {text}", file=sys.stderr, flush=True)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def become_subreaper() -> bool:
    """Orphans of our descendants are re-parented to this process instead of init (Linux 3.4+)."""
    try:
        return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) == 0)
    except (OSError, AttributeError):
        return False


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    delay: float = FIRST_DELAY_S
    restarts: int = 0
    deaths: list[str] = field(default_factory=list)


class Supervisor:
    """``count`` worker processes, each started as ``argv(index)``. ``on_lost(pids)`` hands back the jobs of
    the processes in ``pids``, which are dead: a worker's main process and everything it left behind."""

    def __init__(self, argv: Callable[[int], list[str]], count: int, on_lost: Callable[[set[int]], None],
                 env: dict[str, str] | None = None, sweep: Callable[[], None] | None = None) -> None:
        self.argv, self.on_lost, self.sweep = argv, on_lost, sweep
        self.env = dict(env if env is not None else os.environ)
        self.env["LOWBIT_SUPERVISOR_PID"] = str(os.getpid())
        self.slots = [_Slot(i) for i in range(count)]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="lowbit-supervisor", daemon=True)
        # Processes of ours that died (worker main processes and the orphans they left, which this process
        # kills and reaps as their subreaper): the jobs they ran are lost.
        self._dead: set[int] = set()

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.slots)

    def pids(self) -> list[int]:
        """The worker main processes running now."""
        with self._lock:
            return [s.proc.pid for s in self.slots if s.proc is not None and s.proc.returncode is None]

    def start(self) -> None:
        become_subreaper()
        # Started from the watching thread, which lives as long as the workers: a worker's parent-death signal
        # fires when the *thread* that started it ends.
        self._thread.start()

    def _spawn(self, slot: _Slot) -> None:
        # Same process group as the server: a terminal's Ctrl-C reaches the workers too, and so does a signal
        # sent to the server's whole group.
        proc = subprocess.Popen(self.argv(slot.index), env=self.env)
        with self._lock:
            slot.proc, slot.started = proc, time.monotonic()

    def _watch(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
            assert slot.proc is not None
            _say(f"embedded worker {slot.index + 1} pid {slot.proc.pid}")
        next_sweep = time.monotonic() + SWEEP_S
        while not self._stopping.wait(POLL_S):
            self._reap_orphans()
            if self.sweep is not None and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_S
                try:
                    self.sweep()
                except Exception as exc:  # the database may be away for a moment: the next sweep tries again
                    _say(f"could not look for jobs of dead worker processes ({type(exc).__name__}: {exc})")
            for slot in self.slots:
                proc = slot.proc
                if self._stopping.is_set() or proc is None or proc.poll() is None:
                    continue
                self._restart(slot, proc)

    def _hand_back(self) -> None:
        dead, self._dead = self._dead, set()
        if not dead:
            return
        try:
            self.on_lost(dead)
        except Exception as exc:  # the database may be away: the workers' lease sweep re-queues them later
            _say(f"could not hand back the dead worker's jobs ({type(exc).__name__}: {exc})")

    def _restart(self, slot: _Slot, proc: subprocess.Popen[bytes]) -> None:
        lived = time.monotonic() - slot.started
        how = describe_exit(proc.returncode)
        slot.deaths.append(how)
        self._dead.add(proc.pid)
        # Its pool processes (and their sandbox children) must be gone before its jobs go to another attempt.
        self._kill_orphans(timeout=10.0)
        self._hand_back()
        if lived >= STABLE_S:
            slot.delay = FIRST_DELAY_S
        _say(f"embedded worker {slot.index + 1} (pid {proc.pid}) {how} after {lived:.0f} s; "
             f"restarting it in {slot.delay:g} s")
        if self._stopping.wait(slot.delay):
            return
        waited = slot.delay
        slot.delay = min(MAX_DELAY_S, slot.delay * 2)
        self._spawn(slot)
        slot.restarts += 1
        assert slot.proc is not None
        _say(f"embedded worker {slot.index + 1} restarted as pid {slot.proc.pid} (restart {slot.restarts}, "
             f"after {waited:g} s)")

    def _mains(self) -> set[int]:
        with self._lock:
            return {s.proc.pid for s in self.slots if s.proc is not None}

    def _reap_orphans(self) -> None:
        """Reap children that ended and are not a worker main process (Popen reaps those, with their status):
        peeks with WNOWAIT first, so a worker's exit status is left for its Popen."""
        mains = self._mains()
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid in mains:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)
            self._dead.add(info.si_pid)

    def _kill_orphans(self, timeout: float) -> None:
        """SIGKILL and reap every child that is not a current worker main process, until none is left: a dead
        worker's pool processes, then their sandbox children, which their parent-death signal kills a moment
        later and which are re-parented to us."""
        deadline = time.monotonic() + timeout
        mains = self._mains()
        while True:
            left = [pid for pid in children(os.getpid()) if pid not in mains]
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        self._dead.add(pid)
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every worker (each hands its running job back to the queue and exits), SIGKILL what is left
        after ``timeout``, reap everything, then hand back the jobs of any process that did not get to."""
        self._stopping.set()
        if self._thread.is_alive():  # a restart in progress finishes (or gives up) first
            self._thread.join(timeout=15)
        with self._lock:
            procs = [s.proc for s in self.slots if s.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"embedded worker pid {proc.pid} did not stop within {timeout:g} s; killing it")
                proc.kill()
                proc.wait()
                self._dead.add(proc.pid)
        with self._lock:
            for slot in self.slots:
                slot.proc = None
        self._kill_orphans(timeout=5.0)
        self._hand_back()
