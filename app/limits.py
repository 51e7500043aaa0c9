"""Request body limits, enforced while the body streams in.

The upload routes parse multipart bodies before any route code runs (Starlette spools each file to a
temporary file), so a limit checked in the route would only apply once the whole body had been read and
written to disk. This middleware sits in front of that: a declared ``Content-Length`` above the limit is
refused before a byte of the body is read, and a body without one (chunked) is counted as it arrives and
refused as soon as the count passes the limit; the rest is never read. The 413 carries ``Connection:
close`` so that the server drops the connection instead of draining what the client still sends.

Upload routes may carry ``max_upload_bytes`` per file (plus room for the multipart framing); every other
request body is small JSON or a form and gets ``MAX_SMALL_BODY``.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Files each upload route takes at most (the one-shot job submission and the page form take a model, a
# calibration set and an evaluation set).
UPLOAD_ROUTES: dict[str, int] = {
    "/api/v1/models": 1,
    "/api/v1/datasets": 1,
    "/api/v1/jobs": 3,
    "/jobs/new": 3,
}
# Part headers, boundaries and the small text fields (the job's config JSON) around the files.
MULTIPART_OVERHEAD = 2 * 1024 * 1024
MAX_SMALL_BODY = 1024 * 1024
# A resumable upload's part (PUT /api/v1/uploads/{id}/parts/{n}): raw bytes, at most the largest part size.
_PART_ROUTE = re.compile(r"^/api/v1/uploads/[^/]+/parts/[0-9]+$")
MAX_PART_BYTES = 256 * 1024 * 1024
_METHODS_WITH_BODY = {"POST", "PUT", "PATCH"}


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` once the body passed the limit, to stop it reading."""


def body_limit(path: str, content_type: str, max_upload_bytes: int) -> int:
    """The most bytes a request body to ``path`` may have."""
    if _PART_ROUTE.match(path):
        return MAX_PART_BYTES  # the route checks each part's exact length
    files = UPLOAD_ROUTES.get(path.rstrip("/") or "/")
    if files and content_type.lower().startswith("multipart/form-data"):
        return files * max_upload_bytes + MULTIPART_OVERHEAD
    return MAX_SMALL_BODY


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 10 * 2**20 else f"{n / 2**20:.1f} MB"


def _too_large_page(max_upload_bytes: int) -> bytes:
    """The 413 for a browser's form post: a page, not JSON. Self-contained (no script, no inline style)."""
    limit = html.escape(_mb(max_upload_bytes))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lowbit: upload too large</title>'
        '<link rel="stylesheet" href="/static/style.css"></head><body><main><section class="card">'
        '<h1>Upload too large</h1><div class="notice notice-bad" role="alert" id="size-error">'
        f'<strong>The job was not created:</strong> <span data-field="size-error">this server takes files of at '
        f'most {limit} each (its LOWBIT_MAX_UPLOAD_BYTES). Choose smaller files.</span> '
        '<span class="muted">(<code>upload_too_large</code>)</span></div>'
        '<p><a href="/">Back to the upload form</a></p></section></main></body></html>'
    ).encode()


def _too_large_message(limit: int) -> bytes:
    body = {
        "error": {
            "code": "upload_too_large",
            "message": f"the request body is larger than the limit of {limit} bytes; upload a smaller file "
            "(the server's LOWBIT_MAX_UPLOAD_BYTES sets the per-file limit)",
        }
    }
    return json.dumps(body).encode()


class BodyLimit:
    """Pure ASGI middleware: bodies are counted, never buffered, so uploads still stream."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int | None = None) -> None:
        self.app = app
        # None: read the limit from the application's settings on each request, so a test or an operator
        # changing ``app.state.settings`` is followed.
        self.max_upload_bytes = max_upload_bytes

    def _max_upload(self, scope: Scope) -> int:
        if self.max_upload_bytes is not None:
            return self.max_upload_bytes
        app: Any = scope.get("app")
        return int(app.state.settings.max_upload_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method", "GET") not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        max_upload = self._max_upload(scope)
        path = scope.get("path", "")
        limit = body_limit(path, headers.get("content-type", ""), max_upload)
        # A browser posting a page form gets a page; API clients get the JSON error.
        page = None if path.startswith("/api/") or "text/html" not in headers.get("accept", "") \
            else _too_large_page(max_upload)
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _refuse(send, limit, page)
            return

        received = 0
        tripped = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, tripped
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            # Once the body tripped the limit, whatever the app makes of the interrupted read (a 400 for an
            # unparseable form, a 500) is replaced by the 413 below.
            if tripped:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not tripped:
                raise
        if tripped and not started:
            await _refuse(send, limit, page)


async def _refuse(send: Send, limit: int, page: bytes | None = None) -> None:
    body = page if page is not None else _too_large_message(limit)
    await send({
        "type": "http.response.start",
        "status": 413,
        "headers": [
            (b"content-type", b"text/html; charset=utf-8" if page is not None else b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": body})
