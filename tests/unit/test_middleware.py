"""The ASGI middleware in process, on a stub app: auth (401), body limits (411, 413), open paths."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from malaria.serving.middleware import BearerAuthMiddleware, BodyLimitMiddleware


async def stub_app(scope, receive, send):
    """Answers 200 with the body length it read, so a test sees whether the request got through."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payload = str(len(body)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(payload))]})
    await send({"type": "http.response.body", "body": payload})


def guarded(token: str | None = "s3cret", limit: int = 100, limits: dict[str, int] | None = None):
    app = BodyLimitMiddleware(stub_app, max_body_bytes=limit, body_limits=limits)
    return BearerAuthMiddleware(app, token=token)


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Basic s3cret", 401),
        ("s3cret", 401),
        ("Bearer s3cret", 200),
        ("bearer s3cret", 200),  # the scheme is case-insensitive (RFC 9110)
        ("BEARER s3cret", 200),
    ],
)
def test_bearer_token_is_checked_before_the_app(header, status):
    headers = {"authorization": header} if header else {}
    response = call(guarded(), "POST", "/predict", content=b"x", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"] == "missing or invalid bearer token"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/healthz", "/livez", "/readyz", "/metrics"])
def test_probes_and_metrics_need_no_token(path):
    assert call(guarded(), "GET", path).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),  # BentoML's Swagger page, which declares the token and sends it
        ("GET", "/docs.json", 200),
        ("HEAD", "/docs.json", 200),
        ("GET", "/static_content/swagger-ui-bundle.js", 200),
        ("GET", "/ui/app.js", 200),
        ("POST", "/", 401),
        ("POST", "/docs.json", 401),
        ("GET", "/schema.json", 401),
        ("GET", "/static_content", 401),  # the prefix is a folder, not a name to match loosely
        ("GET", "/docs.jsonx", 401),
    ],
)
def test_pages_and_their_files_are_open_to_get_only(method, path, status):
    assert call(guarded(), method, path).status_code == status


def test_without_a_token_every_path_is_open():
    assert call(guarded(token=None), "POST", "/predict", content=b"x").status_code == 200


def test_auth_answers_before_a_body_limit_is_disclosed():
    response = call(guarded(limit=10), "POST", "/predict", content=b"x" * 50)
    assert response.status_code == 401


def test_declared_body_over_the_limit_is_413_before_it_is_read():
    auth = {"authorization": "Bearer s3cret"}
    assert call(guarded(limit=10), "POST", "/classify", content=b"x" * 10, headers=auth).text == "10"
    response = call(guarded(limit=10), "POST", "/classify", content=b"x" * 11, headers=auth)
    assert response.status_code == 413
    assert response.json()["error"] == "request body of 11 bytes is over the 10-byte limit"


def test_a_route_limit_overrides_the_default():
    app = guarded(token=None, limit=100, limits={"/predict": 5})
    assert call(app, "POST", "/predict", content=b"x" * 6).status_code == 413
    assert call(app, "POST", "/classify", content=b"x" * 6).status_code == 200


def test_chunked_body_without_length_is_411():
    async def chunks():
        yield b"x" * 5

    response = call(guarded(token=None), "POST", "/predict", content=chunks())
    assert response.status_code == 411
    assert "Content-Length" in response.json()["error"]


def test_a_token_from_a_secret_file_loses_its_trailing_newline(monkeypatch):
    from pydantic import ValidationError

    from malaria.config import Settings

    monkeypatch.setenv("MALARIA_API_TOKEN", "s3cret\n")
    assert Settings().api_token == "s3cret"
    monkeypatch.setenv("MALARIA_API_TOKEN", "")  # compose's default: auth off
    assert Settings().api_token is None
    monkeypatch.setenv("MALARIA_API_TOKEN", " \n")  # a Secret holding only a newline: refused, not auth off
    with pytest.raises(ValidationError, match="only whitespace"):
        Settings()


def test_a_required_token_that_is_missing_stops_the_service_from_starting(monkeypatch):
    from pydantic import ValidationError

    from malaria.config import Settings

    monkeypatch.delenv("MALARIA_API_TOKEN", raising=False)
    monkeypatch.setenv("MALARIA_REQUIRE_TOKEN", "true")
    with pytest.raises(ValidationError, match="MALARIA_REQUIRE_TOKEN is set but MALARIA_API_TOKEN is not"):
        Settings()
    monkeypatch.setenv("MALARIA_API_TOKEN", "s3cret")
    assert Settings().api_token == "s3cret"


@pytest.mark.parametrize("api_token", ["s3cret", None])
def test_a_metrics_token_guards_metrics_alone_and_opens_nothing_else(api_token):
    app = BearerAuthMiddleware(stub_app, token=api_token, metrics_token="scrape")
    assert call(app, "GET", "/metrics").status_code == 401
    assert call(app, "GET", "/metrics", headers={"Authorization": "Bearer scrape"}).status_code == 200
    if api_token:  # the API's token is not the scraper's, and the other way round
        assert call(app, "GET", "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 401
        assert call(app, "POST", "/predict", headers={"Authorization": "Bearer scrape"}).status_code == 401
    assert call(app, "GET", "/livez").status_code == 200, "probes stay open"
