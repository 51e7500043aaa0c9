"""One exception family for client-visible errors, each carrying its HTTP status and a stable code."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.examples import ERROR_EXAMPLES
from worker.engine.errors import EngineError


class LowbitError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, code: str | None = None, status_code: int | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        # Machine-readable details beside code and message (e.g. a quota's used and allowed bytes).
        self.extra = extra or {}
        if code:
            self.code = code
        if status_code:
            self.status_code = status_code


class NotFound(LowbitError):
    status_code = 404
    code = "not_found"


class Invalid(LowbitError):
    status_code = 422
    code = "invalid_request"


class Unauthorized(LowbitError):
    status_code = 401
    code = "authentication_required"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": 'Bearer realm="lowbit"'})


class RateLimited(LowbitError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class Conflict(LowbitError):
    status_code = 409
    code = "conflict"


class TooLarge(LowbitError):
    status_code = 413
    code = "upload_too_large"


class Gone(LowbitError):
    status_code = 410
    code = "gone"


class StorageQuotaExceeded(LowbitError):
    """507: the tenant keeps as many bytes as it may; ``used_bytes`` and ``quota_bytes`` say how many."""

    status_code = 507
    code = "storage_quota_exceeded"

    def __init__(self, message: str, used_bytes: int, quota_bytes: int, adding_bytes: int = 0) -> None:
        super().__init__(message, extra={"used_bytes": used_bytes, "quota_bytes": quota_bytes,
                                         "adding_bytes": adding_bytes})


class Unavailable(LowbitError):
    status_code = 503
    code = "unavailable"


class ErrorDetail(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ERROR_EXAMPLES[404]["error"]]})

    code: str
    message: str


class ErrorOut(BaseModel):
    """Every client-visible error: a stable snake_case code and a message that says how to fix it."""

    model_config = ConfigDict(json_schema_extra={"examples": [ERROR_EXAMPLES[422]]})

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the error schema and an example."""
    return {
        status: {"model": ErrorOut, "content": {"application/json": {"example": ERROR_EXAMPLES[status]}}}
        for status in statuses
    }


def from_engine(exc: EngineError, status_code: int = 422) -> LowbitError:
    return LowbitError(exc.message, code=exc.code, status_code=status_code)


def _body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _describe(errors: list[Any]) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is invalid"


def database_unreachable(exc: BaseException) -> bool:
    """The database cannot be reached (down, restarting, connection dropped), as opposed to a bad query."""
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError) or \
        bool(getattr(exc, "connection_invalidated", False))


def _database_unavailable() -> JSONResponse:
    return JSONResponse(
        _body("database_unavailable", "the database is unreachable for the moment (restarting or overloaded); "
              "the request did not complete: try it again in a few seconds"),
        status_code=503, headers={"Retry-After": "5"})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(LowbitError)
    async def _lowbit(_: Request, exc: LowbitError) -> JSONResponse:
        headers = exc.headers or ({"Retry-After": "5"} if exc.status_code == 503 else None)
        return JSONResponse(_body(exc.code, exc.message, **exc.extra), status_code=exc.status_code, headers=headers)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return JSONResponse(_body(exc.code, exc.message), status_code=422)

    @app.exception_handler(sa_exc.DBAPIError)
    async def _database(_: Request, exc: sa_exc.DBAPIError) -> JSONResponse:
        if database_unreachable(exc):
            return _database_unavailable()
        return await _unexpected(_, exc)

    @app.exception_handler(sa_exc.TimeoutError)
    async def _pool_timeout(_: Request, exc: sa_exc.TimeoutError) -> JSONResponse:
        return _database_unavailable()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_body("invalid_request", _describe(list(exc.errors()))), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - last resort
        return JSONResponse(
            _body("internal_error", f"unexpected server error ({type(exc).__name__}); it has been logged"),
            status_code=500,
        )
