"""The HTML pages: the job list with the upload form, and a job's page (live progress, then its report)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.deps import get_db, get_storage
from app.errors import Conflict, LowbitError, NotFound
from app.jobs import service as jobs
from app.jobs.routes import enqueue_committed
from app.pages import present, service
from app.storage import Storage

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
router = APIRouter(tags=["pages"], include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(raw=present.fmt_raw, bytes=present.fmt_bytes, ms=present.fmt_ms,
                             shape=present.fmt_shape)


def _error_page(request: Request, exc: LowbitError) -> HTMLResponse:
    """An error as a page for browsers (they ask for text/html); other clients get the usual JSON error."""
    if "text/html" not in request.headers.get("accept", ""):
        raise exc
    return templates.TemplateResponse(request, "error.html", {"error": exc}, status_code=exc.status_code)


@router.get("/", response_class=HTMLResponse)
def index(request: Request, cursor: str | None = Query(default=None), db: Session = Depends(get_db)) -> Response:
    """The job list, newest first, and the upload form."""
    try:
        ctx = service.list_context(db, cursor)
    except LowbitError as exc:
        return _error_page(request, exc)
    return templates.TemplateResponse(request, "index.html", ctx)


@router.post("/jobs/new", response_class=HTMLResponse)
async def submit_form(request: Request, db: Session = Depends(get_db),
                      storage: Storage = Depends(get_storage)) -> Response:
    """Create a job from the upload form and go to its page; a mistake shows the form again with the reason."""
    settings = request.app.state.settings
    async with request.form(max_files=3, max_fields=20) as form:
        try:
            job = await run_in_threadpool(service.submit_form, db, storage, form, settings.max_upload_bytes,
                                          settings.default_queue)
            await run_in_threadpool(db.commit)
            await enqueue_committed(request, db, job)
        except LowbitError as exc:
            await run_in_threadpool(db.rollback)
            ctx = await run_in_threadpool(service.list_context, db, None)
            ctx.update(form=service.form_values(form), form_error=exc)
            return templates.TemplateResponse(request, "index.html", ctx, status_code=exc.status_code)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, db: Session = Depends(get_db)) -> Response:
    """A job's page: live stage and progress while it runs, then its report, error or cancellation."""
    try:
        ctx = service.job_context(db, job_id)
    except NotFound as exc:
        return _error_page(request, exc)
    return templates.TemplateResponse(request, "job.html", ctx)


@router.post("/jobs/{job_id}/cancel")
def cancel_from_page(job_id: str, db: Session = Depends(get_db)) -> Response:
    """Cancel a queued or running job from its page, then show the page again."""
    try:
        jobs.cancel_job(db, job_id)
        db.commit()
    except (Conflict, NotFound):
        pass  # finished meanwhile, or gone: its page says which
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
