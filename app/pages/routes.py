from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.deps import get_db
from app.jobs import service as jobs
from app.models import service as models

router = APIRouter(tags=["pages"], include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


@router.get("/", response_class=HTMLResponse)
def index(request: Request, cursor: str | None = Query(default=None), db: Session = Depends(get_db)) -> HTMLResponse:
    """The job list."""
    rows, next_cursor = jobs.list_jobs(db, None, 50, cursor)
    return templates.TemplateResponse(
        request, "index.html", {"jobs": [jobs.to_out(j) for j in rows], "next_cursor": next_cursor}
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, db: Session = Depends(get_db)) -> HTMLResponse:
    """A job's status and report."""
    job = jobs.get_job(db, job_id)
    model = models.get_model(db, job.model_id)
    return templates.TemplateResponse(
        request, "job.html", {"job": jobs.to_out(job), "report": job.report, "model_name": model.filename}
    )
