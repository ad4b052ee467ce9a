"""ASGI middleware run before any body is read: auth, body limits, connection recycling."""

from __future__ import annotations

import hmac
import json
from collections import OrderedDict

OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
# Pages and their files, no data in them; the API calls they make carry the token the user gives them:
# the lab page (/ui) and BentoML's Swagger page (/, its files, and the OpenAPI document it reads).
OPEN_PAGES = frozenset({"/", "/ui", "/docs.json"})
OPEN_PREFIXES = ("/ui/", "/static_content/")


def is_open(scope) -> bool:
    """Probes, metrics, and the pages and their files (GET/HEAD only): answered without a token."""
    path = scope["path"]
    if path in OPEN_PATHS:
        return True
    return scope.get("method") in ("GET", "HEAD") and (path in OPEN_PAGES or path.startswith(OPEN_PREFIXES))


class BearerAuthMiddleware:
    """401 for any API call without ``Authorization: Bearer <token>`` when a token is set.

    The scheme name is case-insensitive (RFC 9110, 11.1); the token is compared in constant time.
    Health probes, metrics and the lab page's files (``is_open``) stay open; with ``metrics_token``,
    ``/metrics`` needs that token (and only that one: a scraper gets no API access, a client no metrics).
    """

    def __init__(self, app, token: str | None, metrics_token: str | None = None):
        self.app = app
        self.expected = token.encode() if token else None
        self.metrics_expected = metrics_token.encode() if metrics_token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/metrics" and self.metrics_expected is not None:
            return await self._guard(self.metrics_expected, scope, receive, send)
        if self.expected is None or scope["type"] != "http" or is_open(scope):
            return await self.app(scope, receive, send)
        return await self._guard(self.expected, scope, receive, send)

    async def _guard(self, expected: bytes, scope, receive, send):
        scheme, _, given = dict(scope.get("headers") or []).get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), expected):
            return await json_error(send, 401, "missing or invalid bearer token", [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Body-size checks on the declared length, before any byte of the body is read.

    411 for a body without a declared length (Starlette would spool a chunked upload of any size to
    disk before any limit applies); 413 for a declared body over the path's limit in
    ``body_limits``, else ``max_body_bytes``.
    """

    def __init__(self, app, max_body_bytes: int, body_limits: dict[str, int] | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_limits = body_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if b"transfer-encoding" in headers and b"content-length" not in headers:
            return await json_error(send, 411, "send the request body with a Content-Length (no chunked uploads)")
        declared = headers.get(b"content-length", b"0")
        limit = self.body_limits.get(scope["path"], self.max_body_bytes)
        if declared.isdigit() and int(declared) > limit:
            return await json_error(send, 413, f"request body of {int(declared)} bytes is over the {limit}-byte limit")
        return await self.app(scope, receive, send)


class ConnectionRecycleMiddleware:
    """Close a keep-alive connection after ``max_requests`` responses (``Connection: close``).

    Workers share one listening socket and a keep-alive connection stays with the worker that
    accepted it, so a few long-lived clients can keep one worker busy while another idles. A closed
    connection is reopened by the client and accepted by whichever worker is free: the per-connection
    form of gunicorn's ``max_requests``. ``max_requests=0`` keeps connections open.
    """

    def __init__(self, app, max_requests: int, max_tracked: int = 10_000):
        self.app = app
        self.max_requests = max_requests
        self.max_tracked = max_tracked
        self.counts: OrderedDict[tuple, int] = OrderedDict()

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        if scope["type"] != "http" or self.max_requests <= 0 or not client or not client[1]:
            # No TCP peer to count by (e.g. uvicorn replaced it from X-Forwarded-For: port 0).
            return await self.app(scope, receive, send)
        connection = (tuple(scope["client"]), tuple(scope.get("server") or ()))
        served = self.counts.pop(connection, 0) + 1
        if served < self.max_requests:
            self.counts[connection] = served
            if len(self.counts) > self.max_tracked:  # connections the clients closed themselves
                self.counts.popitem(last=False)
            return await self.app(scope, receive, send)

        async def send_and_close(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, send_and_close)


async def json_error(send, status: int, message: str, extra_headers=()) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
