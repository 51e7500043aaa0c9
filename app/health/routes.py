from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app import workers

router = APIRouter(tags=["health"])


@router.get("/healthz", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={
    200: {"content": {"application/json": {"example": {"status": "ok", "checks": {
        "database": "ok", "workers": "ok", "broker": "ok"}}}}},
    503: {"description": "Not ready", "content": {"application/json": {"example": {
        "status": "unavailable", "checks": {"database": "ok", "broker": "ok",
                                            "workers": "no live worker consumes queue gpu (2 job(s) waiting)"}}}}},
})
def readyz(request: Request) -> JSONResponse:
    """The database and the broker are reachable, and every queue with jobs waiting has a live worker."""
    checks: dict[str, Any] = {}
    ok = True
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        ok = False
        checks["database"] = f"unreachable: {type(exc).__name__}"
    else:
        # Jobs waiting on a queue that no live worker consumes will wait for ever: not ready, and say which.
        try:
            with request.app.state.sessionmaker() as db:
                unserved = workers.unserved(db)
        except Exception as exc:  # e.g. a database not migrated yet (`lowbit migrate`)
            ok = False
            checks["workers"] = f"unknown: {type(exc).__name__}"
        else:
            if unserved:
                ok = False
            checks["workers"] = "; ".join(f"no live worker consumes queue {q} ({n} job(s) waiting)"
                                          for q, n in unserved.items()) or "ok"
    try:
        request.app.state.queue.ping()
        checks["broker"] = "ok"
    except Exception as exc:
        ok = False
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)
