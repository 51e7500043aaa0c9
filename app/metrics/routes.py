from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from sqlalchemy.orm import Session

from app.deps import get_db
from app.examples import METRICS_EXAMPLE
from app.metrics import service

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text format 0.0.4",
                             "content": {"text/plain": {"schema": {"type": "string"}, "example": METRICS_EXAMPLE}}}})
def metrics(db: Session = Depends(get_db)) -> PlainTextResponse:
    """Prometheus metrics, computed from the database: jobs by status and recipe, queue depth, job and stage
    duration histograms, upload bytes, webhook deliveries."""
    return PlainTextResponse(service.render(db), media_type=service.CONTENT_TYPE)
