"""Processes on this machine, read from /proc (Linux): is the process a job row names still there, which
processes does a given one parent. Shared by the worker (taking over a job whose pool process died) and
`lowbit serve`'s supervisor (cleaning up after a worker that died)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state, ppid, pgrp, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed, but not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    fields = _stat_fields(pid)
    return fields is None or fields[0] != "Z"


def process_gone(worker: str | None) -> bool:
    """True when ``worker`` (a job row's hostname:pid) names a process on this host that no longer exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not alive(int(pid))


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(ValueError):
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return found
