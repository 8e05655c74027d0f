"""The guard every request passes: the API key, the body size, security headers and the
request metrics."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

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


def route_label(request: Request) -> str:
    """The metrics label of a request: its route's template (``/static`` for the mount), one
    label for every path no route matched, so probes cannot grow the series without bound."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class Guard:
    """Every request: the API key, the body size, security headers and the request metrics."""

    def __init__(self, state: ServerState):
        self.state = state

    def check(self, request: Request, body: bytes | None) -> None:
        key, limit = self.state.api_key, self.state.limits.max_body_bytes
        path = request.url.path
        public = path in PAGE or path.startswith("/static/") or (path in PROBES and not self.state.private_probes)
        if key and not public:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
                raise HTTPError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                code="invalid_api_key")
        if body is not None and len(body) > limit:
            raise HTTPError(413, f"request body of {len(body)} bytes exceeds {limit}", code="body_too_large")

    async def __call__(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.state.limits.max_body_bytes:
                raise HTTPError(413, f"request body of {length} bytes exceeds "
                                     f"{self.state.limits.max_body_bytes}", code="body_too_large")
            self.check(request, await request.body() if request.method == "POST" else None)
            response = await call_next(request)
        except HTTPError as e:
            response = e.response()
        response.headers.update(SECURITY_HEADERS)
        route = route_label(request)
        self.state.metrics.requests.labels(route, str(response.status_code)).inc()
        self.state.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response
