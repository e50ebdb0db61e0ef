"""The guard every engine's app shares, driven over ASGI (httpx's ASGI transport) on the real
FastAPI front: the key and the limits under a route prefix, /health without names, body size,
request caps, CORS. The routes behind it echo what reached them."""

import asyncio
import json

import httpx
import pytest
from fastapi import Request

from lmflow_ray.config import load_recipe
from lmflow_ray.serve.front import ProxyErrors, front
from lmflow_ray.serve.openai_api import Limits, check_limits, APIError

KEY = "sk-guard-test-key"


def _app(*overrides):
    section = load_recipe(None, [f"api_key={KEY}", "max_new_tokens=64", "max_request_bytes=4096", *overrides]).serve
    app = front(section, lambda: {"engine": "x", "models": ["tiny", "tiny:secret-adapter-name"]},
                ["tiny", "tiny:secret-adapter-name"])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return {"reached": json.loads(await request.body())}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return {"reached": True}

    @app.get("/docs")
    async def docs():
        return {"reached": True}

    return app


def call(app, method, path, root_path="", **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://guard.test") as client:
            return await client.request(method, root_path + path, **kwargs)

    return asyncio.run(go())


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("root", ["", "/llm"])
def test_every_route_but_the_page_and_health_needs_the_key_also_under_a_prefix(root):
    app = _app()
    for method, path in [("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("GET", "/docs"), ("GET", "/v1/nothing")]:
        r = call(app, method, path, root_path=root, json=CHAT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (root, path)
    r = call(app, "POST", "/v1/chat/completions", root_path=root, json=CHAT, headers=AUTH)
    assert r.status_code == 200 and r.json()["reached"]["max_tokens"] == 4
    health = call(app, "GET", "/health", root_path=root)
    assert health.status_code == 200 and health.json() == {"status": "ok"}  # no model or adapter names
    assert call(app, "GET", "/", root_path=root).status_code == 200


def test_without_a_key_health_describes_the_server():
    section = load_recipe(None, []).serve
    app = front(section, lambda: {"engine": "x", "models": ["tiny"]}, ["tiny"])
    assert call(app, "GET", "/health").json() == {"status": "ok", "engine": "x", "models": ["tiny"]}


def test_a_body_over_the_limit_gets_413_before_it_is_read():
    app = _app()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]}
    r = call(app, "POST", "/v1/chat/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"x" * 1000

    r = call(app, "POST", "/v1/chat/completions", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    r = call(app, "POST", "/v1/chat/completions", content=b"{}", headers={**AUTH, "Content-Length": "lots"})
    assert r.status_code == 400 and r.json()["error"]["message"]


@pytest.mark.parametrize("extra,param", [({"max_tokens": 65}, "max_tokens"), ({"max_completion_tokens": 1000},
                                         "max_completion_tokens"), ({"n": 9}, "n"), ({"stop": ["x" * 300]}, "stop")])
def test_requests_past_the_caps_get_400_naming_the_field(extra, param):
    r = call(_app(), "POST", "/v1/chat/completions", json={**CHAT, **extra}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_the_caps_fill_in_max_tokens_for_an_engine_that_would_not_stop():
    limits = Limits(max_new_tokens=32, max_n=4, fill_max_tokens=True)
    assert check_limits({"model": "m", "prompt": "x"}, limits)["max_tokens"] == 32
    assert check_limits({"model": "m", "prompt": "x", "n": 4, "max_tokens": 8}, limits)["max_tokens"] == 8
    with pytest.raises(APIError):
        check_limits({"model": "m", "prompt": "x", "n": 5}, limits)


def test_cors_is_off_unless_the_recipe_names_origins():
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    closed = call(_app(), "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    app = _app("cors_allow_origins=https://chat.example")
    ok = call(app, "OPTIONS", "/v1/chat/completions", headers={**preflight, "Origin": "https://chat.example"})
    assert ok.headers.get("access-control-allow-origin") == "https://chat.example"
    assert "access-control-allow-credentials" not in ok.headers
    other = call(app, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert other.headers.get("access-control-allow-origin") is None


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "tiny:unknown-adapter", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'.replace(b"\\\\", b"\\"), 400,
     "messages.0.content"),
    (b'{"model": "tiny", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', 400, "seed"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"7" * 5000 + b"}", 400, None),
])
def test_the_guard_answers_for_every_engine_before_the_route(body, status, param):
    """What once gave the vLLM engine a 500 never reaches it: the guard validates every
    generation request itself (the route here would echo anything)."""
    r = call(_app("max_request_bytes=16384"), "POST", "/v1/chat/completions", content=body,
             headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text[:300]


def test_openapi_describes_the_served_requests_with_this_servers_caps():
    doc = call(_app("max_n=3"), "GET", "/openapi.json", headers=AUTH).json()
    chat = doc["components"]["schemas"]["ChatRequest"]
    assert chat["properties"]["model"]["enum"] == ["tiny", "tiny:secret-adapter-name"]
    assert {"type": "integer", "minimum": 1, "maximum": 64} in chat["properties"]["max_tokens"]["anyOf"]
    assert chat["properties"]["n"]["maximum"] == 3 and "messages" in chat["required"]
    assert set(doc["paths"]) == {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    assert call(_app(), "GET", "/openapi.json").status_code == 401  # behind the key like the API


def test_the_proxy_gives_its_own_plain_answers_the_openai_body():
    async def plain(scope, receive, send):  # what Serve's proxy sends when its queue is full
        status = 503 if scope["path"] == "/busy" else 200
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

    app = ProxyErrors(plain)
    busy = call(app, "GET", "/busy")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "overloaded" and "backpressure" in busy.json()["error"]["message"]
    fine = call(app, "GET", "/fine")
    assert fine.status_code == 200 and fine.text == "Request dropped due to backpressure"
