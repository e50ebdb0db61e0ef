"""What every engine's app shares: the guard (body size, API key, request limits, admission),
OpenAI-shaped error bodies, CORS only where the recipe opens it, the web chat page at `/`, /health,
and the replica / autoscaling options from the recipe."""

import os
from importlib import resources
from typing import Any

from fastapi import Request

from lmflow_ray.config import ServeSection
from lmflow_ray.credentials import Secret, secret
from lmflow_ray.serve.openai_api import APIError, Guard, Limits, error_body

API_KEY_ENV = "LMFLOW_RAY_API_KEY"


def api_key(section: ServeSection) -> Secret | None:
    return section.api_key or secret(os.environ.get(API_KEY_ENV))


def page() -> str:
    return resources.files("lmflow_ray.serve").joinpath("webchat.html").read_text()


def front(section: ServeSection, describe: Any, app: Any = None, fill_max_tokens: bool = False) -> Any:
    """The FastAPI app (a new one, or ``app``) with the guard, error bodies in OpenAI's shape,
    the page at `/` and /health. With an API key set, /health says "ok" and nothing more."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    if app is None:
        app = FastAPI(title="lmflow-ray", docs_url=None, redoc_url=None, openapi_url=None)
    key = api_key(section)
    app.add_middleware(Guard, api_key=key, limit=section.max_ongoing_requests,
                       limits=Limits.from_section(section, fill_max_tokens))
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

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def _page() -> str:
        return page()

    @app.get("/health")
    async def _health() -> dict[str, Any]:
        return {"status": "ok"} if key is not None else {"status": "ok", **describe()}

    return app


def deployment_options(section: ServeSection) -> dict[str, Any]:
    """Replicas, autoscaling and limits. The guard in each replica enforces max_ongoing_requests
    (503 + Retry-After); Serve is told a higher limit so that extra requests reach the guard and
    get their answer at once instead of waiting in the proxy. Serve's own queue stays bounded."""
    headroom = max(4 * section.max_ongoing_requests, section.max_ongoing_requests + 64)
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
