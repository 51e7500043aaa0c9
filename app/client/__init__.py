"""The lowbit client: a typed Python API (``Client``) and the ``lowbit submit/status/download/report/jobs``
commands built on it. It needs httpx only; it imports nothing of the server, the engine, torch or ONNX Runtime.

    from app.client import Client

    result = Client("http://127.0.0.1:8000").quantize("model.onnx", calib="calib.npz", recipe="int8_static")
    result.download("model.int8.onnx")
"""

from app.client.core import Client, Download, Event, Job, JobError, Result, Upload
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
