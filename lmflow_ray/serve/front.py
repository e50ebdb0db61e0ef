"""What every engine's app shares: the guard (body size, API key, request limits, admission),
OpenAI-shaped error bodies, CORS only where the recipe opens it, the web chat page at `/`, /health,
and the replica / autoscaling options from the recipe."""

import os
from importlib import resources
from typing import Any

from fastapi import Request

from lmflow_ray.config import ServeSection
from lmflow_ray.credentials import Secret, secret
from lmflow_ray.serve.openai_api import (
    APIError, Guard, Limits, error_body, openapi_document, overloaded_body, send_json,
)

API_KEY_ENV = "LMFLOW_RAY_API_KEY"


def api_key(section: ServeSection) -> Secret | None:
    return section.api_key or secret(os.environ.get(API_KEY_ENV))


def page() -> str:
    return resources.files("lmflow_ray.serve").joinpath("webchat.html").read_text()


def front(section: ServeSection, describe: Any, models: list[str], app: Any = None, fill_max_tokens: bool = False,
          no_prompt_logprobs: str | None = None) -> Any:
    """The FastAPI app (a new one, or ``app``) with the guard, error bodies in OpenAI's shape,
    the page at `/`, /health and /openapi.json. With an API key set, /health says "ok" and nothing
    more. ``models``: the served names (others get 404 in the guard, on every engine)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    if app is None:
        app = FastAPI(title="lmflow-ray", docs_url=None, redoc_url=None, openapi_url=None)
    key = api_key(section)
    limits = Limits.from_section(section, fill_max_tokens, no_prompt_logprobs)
    names = list(models)
    app.add_middleware(Guard, api_key=key, limit=section.max_ongoing_requests, limits=limits, models=names)
    if section.cors_allow_origins:  # outside the guard: a browser's preflight carries no key
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=section.cors_allow_origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return JSONResponse(error_body(f"{param}: {first['msg']}" if param else first["msg"], param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(err.detail), kind=kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _failed(_: Request, err: Exception) -> JSONResponse:  # a bug of ours: still OpenAI's shape
        return JSONResponse(error_body(f"the server failed: {type(err).__name__}", kind="server_error"), status_code=500)

    @app.get("/openapi.json", include_in_schema=False)
    async def _openapi() -> dict[str, Any]:
        return openapi_document(limits, names)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def _page() -> str:
        return page()

    @app.get("/health")
    async def _health() -> dict[str, Any]:
        return {"status": "ok"} if key is not None else {"status": "ok", **describe()}

    return app


def deployment_options(section: ServeSection) -> dict[str, Any]:
    """Replicas, autoscaling and limits. The guard in each replica enforces max_ongoing_requests
    (503 with a JSON body and Retry-After, at once). Serve is told a limit far above it, so that a
    burst reaches the guard instead of Serve's own queue (whose 503 the proxy answers itself; the
    proxy middleware below gives that one the same body, for bursts past even this headroom)."""
    headroom = max(16 * section.max_ongoing_requests, section.max_ongoing_requests + 1024)
    options: dict[str, Any] = {
        "max_ongoing_requests": headroom,
        "max_queued_requests": headroom,
        "ray_actor_options": {"num_cpus": section.num_cpus_per_replica},
    }
    if section.min_replicas == section.max_replicas:
        options["num_replicas"] = section.max_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": section.min_replicas, "max_replicas": section.max_replicas,
            "target_ongoing_requests": section.target_ongoing_requests,
        }
    return options


PROXY_CALLBACK = "lmflow_ray.serve.front:proxy_middlewares"  # RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH


class ProxyErrors:
    """ASGI middleware for Serve's HTTP proxy: a plain-text answer the proxy makes itself (its
    queue-overflow 503, a 404 for a path no application serves, a 408 timeout) becomes OpenAI's
    JSON error body; a 503 or 429 also gets Retry-After. The applications' own answers (already
    JSON) pass through untouched."""

    def __init__(self, app: Any, retry_after_s: int = 1):
        self.app, self.retry_after_s = app, retry_after_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def rewrite(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                kind = dict(message.get("headers") or []).get(b"content-type", b"")
                if not kind.startswith(b"application/json"):
                    held["start"] = message
                    held["body"] = b""
                    return
            if "start" in held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                await self._answer(send, held.pop("start")["status"], held.pop("body"))
                return
            await send(message)

        await self.app(scope, receive, rewrite)

    async def _answer(self, send: Any, status: int, text: bytes) -> None:
        headers: dict[str, str] = {}
        if status in (429, 503):
            headers["Retry-After"] = str(self.retry_after_s)
            body = overloaded_body()
            body["error"]["message"] += f" ({text.decode('utf-8', 'replace').strip()[:200]})"
        else:
            kind = "invalid_request_error" if status < 500 else "server_error"
            body = error_body(text.decode("utf-8", "replace").strip()[:500] or f"HTTP {status}", kind=kind)
        await send_json(send, status, body, headers)


def proxy_middlewares() -> list[Any]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) for its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


def start_serve(host: str, port: int, proxy_location: str = "EveryNode") -> Any:
    """``serve.start`` with the proxy listening on host:port (on every node, or the head only) and
    ProxyErrors in it: the callback's import path goes in the controller's environment, which the
    proxies it starts inherit. (A `serve run` config or a RayService sets
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH itself.)"""
    from ray import serve

    return serve.start(proxy_location=proxy_location, http_options={"host": host, "port": port}, controller_options={
        "runtime_env": {"env_vars": {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}}})
