"""The HTML pages: the job list with the upload form, and a job's page (live progress, then its report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app import auth
from app.auth import PagePrincipal
from app.deps import SessionDep, StorageDep
from app.errors import Conflict, LowbitError, NotFound, Unauthorized
from app.jobs import service as jobs
from app.jobs.routes import enqueue_committed
from app.pages import present, service
from app.tenants import service as tenants
from app.tenants.service import Principal

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
    return templates.TemplateResponse(request, "error.html", _common(request, {"error": exc}),
                                      status_code=exc.status_code)


def _common(request: Request, ctx: dict[str, Any]) -> dict[str, Any]:
    """What every page's layout needs: the forms' CSRF token, who is signed in (keyed servers), and the
    per-file upload limit (the upload form checks it before sending anything)."""
    who = getattr(request.state, "principal", None)
    signed_in = request.app.state.keys_required and who is not None and auth.session_id(request) != \
        auth.KEYLESS_SESSION
    ctx.update(csrf_token=auth.csrf_for(request), signed_in_as=ctx.get("signed_in_as") or
               (who.tenant_name if signed_in and who else None),
               max_upload_bytes=request.app.state.settings.max_upload_bytes)
    return ctx


def _safe_next(target: str | None) -> str:
    """Only paths on this server: never another host (//evil.example or a scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def sign_in_first(request: Request, _: Exception) -> RedirectResponse:
    """The handler of auth.SignInRequired (a page asked for without a signed-in tenant, app/main.py installs it):
    to /login, which comes back to the page asked for."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?{urlencode({'next': path})}", status_code=303)


def _csrf_refused(request: Request) -> HTMLResponse:
    exc = LowbitError("the form is stale or did not come from this site (missing or wrong CSRF token); reload the "
                      "page and submit it again", code="csrf_failed", status_code=403)
    return templates.TemplateResponse(request, "error.html", _common(request, {"error": exc}), status_code=403)


@router.get("/", response_class=HTMLResponse)
def index(request: Request, db: SessionDep, who: PagePrincipal, cursor: str | None = Query(default=None)) -> Response:
    """The job list, newest first, and the upload form."""
    try:
        ctx = service.list_context(db, cursor, tenant_id=who.tenant_id)
    except LowbitError as exc:
        return _error_page(request, exc)
    return templates.TemplateResponse(request, "index.html", _common(request, ctx))


@router.post("/jobs/new", response_class=HTMLResponse)
async def submit_form(request: Request, db: SessionDep, storage: StorageDep, who: PagePrincipal) -> Response:
    """Create a job from the upload form and go to its page; a mistake shows the form again with the reason."""
    settings = request.app.state.settings
    async with request.form(max_files=3, max_fields=20) as form:
        token = form.get("csrf_token")
        if not auth.csrf_ok(request, token if isinstance(token, str) else None):
            return _csrf_refused(request)
        try:
            job = await run_in_threadpool(service.submit_form, db, storage, form=form, settings=settings,
                                          tenant_id=who.tenant_id)
            await run_in_threadpool(db.commit)
            await enqueue_committed(request, db, job)
        except LowbitError as exc:
            await run_in_threadpool(db.rollback)
            ctx = await run_in_threadpool(service.list_context, db, None, tenant_id=who.tenant_id)
            ctx.update(form=service.form_values(form), form_error=exc)
            return templates.TemplateResponse(request, "index.html", _common(request, ctx),
                                              status_code=exc.status_code, headers=exc.headers)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request, db: SessionDep, who: PagePrincipal) -> Response:
    """A job's page: live stage and progress while it runs, then its report, error or cancellation."""
    try:
        ctx = service.job_context(db, job_id, tenant_id=who.tenant_id)
    except NotFound as exc:
        return _error_page(request, exc)
    return templates.TemplateResponse(request, "job.html", _common(request, ctx))


@router.post("/jobs/{job_id}/cancel")
async def cancel_from_page(job_id: str, request: Request, db: SessionDep, who: PagePrincipal) -> Response:
    """Cancel a queued or running job from its page, then show the page again."""
    form = await request.form(max_files=0, max_fields=5)
    token = form.get("csrf_token")
    if not auth.csrf_ok(request, token if isinstance(token, str) else None):
        return _csrf_refused(request)
    try:
        await run_in_threadpool(jobs.cancel_job, db, job_id, tenant_id=who.tenant_id)
        await run_in_threadpool(db.commit)
    except (Conflict, NotFound):
        pass  # finished meanwhile, or gone: its page says which
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = Query(default=None)) -> Response:
    """Sign in with an API key (servers that require keys)."""
    return _login_form(request, _safe_next(next), None, 200)


def _login_form(request: Request, next_path: str, error: str | None, status: int) -> HTMLResponse:
    ttl_hours = max(1, request.app.state.settings.session_ttl_s // 3600)
    return templates.TemplateResponse(request, "login.html", _common(request, {
        "next": next_path, "error": error, "ttl_hours": ttl_hours}), status_code=status)


def _signed_in(request: Request, who: Principal, next_path: str) -> RedirectResponse:
    settings = request.app.state.settings
    token = tenants.make_token(request.app.state.session_secret, "session", who=who, ttl_s=settings.session_ttl_s)
    resp = RedirectResponse(next_path, status_code=303)
    resp.set_cookie(auth.SESSION_COOKIE, token, max_age=settings.session_ttl_s, httponly=True, samesite="lax",
                    secure=request.url.scheme == "https", path="/")
    return resp


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, db: SessionDep) -> Response:
    """Check the key and set the session cookie; the key itself is not stored in the browser."""
    if not auth.same_origin(request):
        return _csrf_refused(request)
    form = await request.form(max_files=0, max_fields=5)
    key, next_raw = form.get("api_key"), form.get("next")
    next_path = _safe_next(next_raw if isinstance(next_raw, str) else None)
    if not isinstance(key, str) or not key.strip():
        return _login_form(request, next_path, "paste your API key", 401)
    try:
        who = await run_in_threadpool(tenants.authenticate, db, key)
    except Unauthorized as exc:
        return _login_form(request, next_path, exc.message, 401)
    return _signed_in(request, who, next_path)


@router.get("/login/link")
def login_link(request: Request, db: SessionDep, token: str = Query(default="")) -> Response:
    """A short-lived signed link (from POST /api/v1/jobs/{id}/page-link) that opens a job page in a browser."""
    found = tenants.read_token(request.app.state.session_secret, "link", token=token)
    if found is None or (found[0].key_id and
                         not tenants.key_is_active(db, found[0].key_id, tenant_id=found[0].tenant_id)):
        return _login_form(request, "/", "the link has expired or is not valid; sign in with your API key", 401)
    who, body = found
    return _signed_in(request, who, _safe_next(f"/jobs/{body.get('job', '')}" if body.get("job") else "/"))


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the browser session."""
    form = await request.form(max_files=0, max_fields=5)
    token = form.get("csrf_token")
    if not auth.csrf_ok(request, token if isinstance(token, str) else None):
        return _csrf_refused(request)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(auth.SESSION_COOKIE, path="/")
    return resp
