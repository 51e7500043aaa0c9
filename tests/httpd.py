"""Small HTTP servers on 127.0.0.1 that tests start: a webhook receiver that records what it gets and answers
with scripted statuses, and a forwarding proxy that can damage artifact downloads or hide the event stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Records every POST; answers each with the next status of ``statuses`` (then 200)."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def answer(self) -> int:
        return self.statuses.pop(0) if self.statuses else 200


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def receiver(*statuses: int) -> Iterator[Receiver]:
    rec = Receiver(list(statuses))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            with lock:
                rec.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                             time.monotonic()))
                status = rec.answer()
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    with serve(Handler) as url:
        rec.url = url
        yield rec


@dataclass
class Proxy:
    """Forwards every request to ``upstream``; with ``corrupt`` it flips a byte of artifact bodies (keeping the
    real ETag), with ``hide_events`` it answers the event stream with 404."""

    upstream: str
    corrupt: bool = False
    hide_events: bool = False
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""


@contextmanager
def proxy(upstream: str) -> Iterator[Proxy]:
    p = Proxy(upstream)
    client = httpx.Client(base_url=upstream, timeout=120)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length",
                                                                                   "connection")}
            p.seen.append((self.command, self.path, {k.lower(): v for k, v in headers.items()}))
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if p.hide_events and self.path.split("?")[0].endswith("/events"):
                self._send(404, {"content-type": "application/json"},
                           b'{"error": {"code": "not_found", "message": "Not Found"}}')
                return
            r = client.request(self.command, self.path, content=body, headers=headers)
            content = r.content
            if p.corrupt and self.path.split("?")[0].endswith("/artifact") and content:
                content = bytes([content[0] ^ 0xFF]) + content[1:]
            keep = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "etag", "content-disposition")}
            self._send(r.status_code, keep, content)

        def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_DELETE = _forward  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    try:
        with serve(Handler) as url:
            p.url = url
            yield p
    finally:
        client.close()
