"""Who is asking: the FastAPI dependencies that turn a request into a tenant.

- ``Authorization: Bearer <key>`` works everywhere.
- The browser session cookie (set by /login) works for pages, and for the API's safe methods (the pages'
  live updates and downloads); a cookie never authorizes an API write, and page forms also carry a CSRF
  token bound to the session.
- With neither, a keyless server (bound to loopback) treats the request as the local tenant; a server that
  requires keys answers 401 (pages redirect to /login).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.deps import SessionDep
from app.errors import Unauthorized
from app.settings import Settings
from app.tenants import service
from app.tenants.service import LOCAL, Principal

SESSION_COOKIE = "lowbit_session"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
KEYLESS_SESSION = "keyless"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def keys_required(request: Request) -> bool:
    return bool(request.app.state.keys_required)


def _secret(request: Request) -> bytes:
    secret: bytes = request.app.state.session_secret
    return secret


def _from_header(request: Request, db: Session) -> Principal | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'", code="invalid_authorization")
    return service.authenticate(db, value)


def session_principal(request: Request, db: Session) -> Principal | None:
    """The tenant of a valid, unexpired session cookie whose key is still active."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    found = service.read_token(_secret(request), "session", token=cookie)
    if found is None:
        return None
    who, _ = found
    if who.key_id is not None and not service.key_is_active(db, who.key_id, tenant_id=who.tenant_id):
        return None
    return who


def _resolve(request: Request, db: Session, cookie_ok: bool) -> Principal | None:
    who = _from_header(request, db)
    if who is None and cookie_ok:
        who = session_principal(request, db)
    if who is None and not keys_required(request):
        who = LOCAL
    if who is not None:
        request.state.principal = who
    return who


def api_principal(request: Request, db: SessionDep) -> Principal:
    """The tenant of an API request; 401 without valid credentials on a server that requires keys."""
    who = _resolve(request, db, cookie_ok=request.method in SAFE_METHODS)
    if who is None:
        raise Unauthorized("this server requires an API key: send 'Authorization: Bearer <key>' (an administrator "
                           "creates one with 'lowbit keys create --tenant NAME')")
    return who


class SignInRequired(Exception):
    """A page request without a signed-in tenant: the pages' handler sends the browser to /login (and back)."""


def page_principal(request: Request, db: SessionDep) -> Principal:
    """The tenant of a page request; SignInRequired without one."""
    who = _resolve(request, db, cookie_ok=True)
    if who is None:
        raise SignInRequired
    return who


ApiPrincipal = Annotated[Principal, Depends(api_principal)]
PagePrincipal = Annotated[Principal, Depends(page_principal)]


def session_id(request: Request) -> str:
    """What a page's CSRF token is bound to: the session cookie, or the keyless server itself."""
    return request.cookies.get(SESSION_COOKIE) or KEYLESS_SESSION


def csrf_for(request: Request) -> str:
    return service.csrf_token(_secret(request), session_id(request))


def csrf_ok(request: Request, presented: str | None) -> bool:
    return same_origin(request) and service.check_csrf(_secret(request), session_id(request), presented=presented)


def same_origin(request: Request) -> bool:
    """A form post from a page of this server: browsers send Origin on posts, and one naming another site
    is refused (this also covers /login, which has no session to bind a token to yet)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser, or an old one: the token (or, for /login, the key itself) decides
    return origin != "null" and urlsplit(origin).netloc == request.headers.get("host", "")
