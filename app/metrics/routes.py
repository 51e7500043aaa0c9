from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from app.auth import ApiPrincipal
from app.deps import SessionDep
from app.errors import error_responses
from app.examples import METRICS_EXAMPLE
from app.metrics import service

router = APIRouter(tags=["metrics"], responses=error_responses(401))


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text format 0.0.4",
                             "content": {"text/plain": {"schema": {"type": "string"}, "example": METRICS_EXAMPLE}}}})
def metrics(request: Request, db: SessionDep, _: ApiPrincipal) -> PlainTextResponse:
    """Prometheus metrics, computed from the database: jobs by status and recipe, queue depth, job and stage
    duration histograms, upload bytes, webhook deliveries. Server-wide totals (no ids or names); a server that
    requires keys answers them to any valid key."""
    # `lowbit serve`'s supervisor counts the embedded workers it restarted (None: this server supervises none).
    supervisor = getattr(request.app.state, "supervisor", None)
    restarts = supervisor.restarts if supervisor is not None else None
    return PlainTextResponse(service.render(db, restarts), media_type=service.CONTENT_TYPE)
