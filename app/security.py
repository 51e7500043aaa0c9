"""Security headers on every response: a strict Content-Security-Policy and ``nosniff``.

The pages load scripts, styles and images only from this server and have no inline script or style, so
the policy can forbid everything else. FastAPI's own API docs (/docs, /redoc) load Swagger UI and ReDoc
from a CDN with inline scripts; they are the one exception and get ``nosniff`` only.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


class SecurityHeaders:
    """Pure ASGI middleware (it does not buffer bodies, so file downloads still stream)."""

    def __init__(self, app: ASGIApp, exempt_from_csp: tuple[str, ...] = ()) -> None:
        self.app = app
        self.exempt = exempt_from_csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        with_csp = not any(path == p or path.startswith(p + "/") for p in self.exempt)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                if with_csp:
                    headers.setdefault("Content-Security-Policy", CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)
