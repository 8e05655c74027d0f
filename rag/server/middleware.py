"""The guard every request passes: the API key, the body size, security headers and the
request metrics. A plain ASGI middleware: the app below it reads the client's own ``receive``
once the body is replayed, so a JSON request sees its client hang up (Starlette's
``BaseHTTPMiddleware`` hides that)."""

from __future__ import annotations

import hmac
import time

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rag.server.errors import HTTPError
from rag.server.state import ServerState

#: The playground loads nothing from elsewhere and runs no inline script; report images are blobs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE = ("/", "/favicon.ico")  # the page holds nothing secret
PROBES = ("/health", "/metrics")  # public unless the server was started with private_probes


def route_label(scope: Scope) -> str:
    """The metrics label of a request: its route's template (``/static`` for the mount), one
    label for every path no route matched, so probes cannot grow the series without bound."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else "unmatched"


class Guard:
    """Every request: the API key, the body size, security headers and the request metrics."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    def check_key(self, request: Request) -> None:
        key, path = self.state.api_key, request.url.path
        public = path in PAGE or path.startswith("/static/") or (path in PROBES and not self.state.private_probes)
        if key and not public:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
                raise HTTPError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                code="invalid_api_key")

    async def read_body(self, request: Request, receive: Receive) -> bytes:
        """The whole body, or 413 as soon as it passes the limit (declared or sent)."""
        limit = self.state.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, f"request body of {length} bytes exceeds {limit}", code="body_too_large")
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise HTTPError(413, f"request body of more than {limit} bytes", code="body_too_large")
        return body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        try:
            request = Request(scope)
            self.check_key(request)
            body = await self.read_body(request, receive) if scope["method"] == "POST" else None
            await self.app(scope, _replay(body, receive) if body is not None else receive, send_guarded)
        except HTTPError as e:
            await e.response()(scope, receive, send_guarded)
        finally:
            route = route_label(scope)
            self.state.metrics.requests.labels(route, str(status[0])).inc()
            self.state.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that hands over the body read already, then the client's own messages
    (``http.disconnect`` when it hangs up)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
