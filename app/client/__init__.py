"""The lowbit client: a typed Python API (``Client``) and the ``lowbit submit/status/download/report/jobs``
commands built on it. It needs httpx only; it imports nothing of the server, the engine, torch or ONNX Runtime.

    from app.client import Client

    result = Client("http://127.0.0.1:8000").quantize("model.onnx", calib="calib.npz", recipe="int8_static")
    result.download("model.int8.onnx")
"""

from typing import TYPE_CHECKING, Any

from app.client.errors import (
    ApiError,
    ChecksumMismatch,
    JobCancelled,
    JobFailed,
    LowbitClientError,
    ServerUnreachable,
    WaitTimeout,
)

__all__ = [
    "ApiError", "ChecksumMismatch", "Client", "Download", "Event", "Job", "JobCancelled", "JobError", "JobFailed",
    "LowbitClientError", "Result", "ServerUnreachable", "Upload", "WaitTimeout",
]

if TYPE_CHECKING:
    from app.client.core import Client, Download, Event, Job, JobError, Result, Upload

_CORE = {"Client", "Download", "Event", "Job", "JobError", "Result", "Upload"}


def __getattr__(name: str) -> Any:
    if name in _CORE:
        # lazy: httpx brings rich, click and pygments (20 MB) into every `lowbit` command, `lowbit quantize`,
        # serve and worker included, which import this package for its command-line helpers and never talk HTTP
        from app.client import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
