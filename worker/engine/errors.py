"""Engine errors: a stable snake_case code plus a message a user can act on."""

from __future__ import annotations


class EngineError(Exception):
    """A failure the user can understand and fix (bad model, bad data, unsupported construct)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class JobCancelled(Exception):
    """Raised from the progress callback when the job was cancelled while running."""
