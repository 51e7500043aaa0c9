"""The client's exceptions. Each carries a stable ``code``: the server's error code where the server gave one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.client.core import Job


class LowbitClientError(Exception):
    """Anything that went wrong, with a snake_case ``code`` and a message saying what to do."""

    code = "client_error"

    def __init__(self, message: str, code: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.status_code = status_code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ApiError(LowbitClientError):
    """The server refused the request; ``code`` and ``message`` are the server's, ``status_code`` its HTTP
    status."""

    code = "api_error"


class ServerUnreachable(LowbitClientError):
    code = "server_unreachable"


class JobFailed(LowbitClientError):
    """The job ended ``failed``; ``code`` and ``message`` are the job's error, ``job`` the job."""

    code = "job_failed"

    def __init__(self, job: Job) -> None:
        err = job.error
        super().__init__(err.message if err else "the job failed without an error message",
                         code=err.code if err else None)
        self.job = job


class JobCancelled(LowbitClientError):
    code = "job_cancelled"

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} was cancelled; no quantized model was kept")
        self.job = job


class ChecksumMismatch(LowbitClientError):
    """A download's SHA-256 differs from the server's ETag (or there was no ETag): nothing was written."""

    code = "checksum_mismatch"


class WaitTimeout(LowbitClientError):
    code = "wait_timeout"
