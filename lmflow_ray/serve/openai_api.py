"""The OpenAI wire format: request schemas, error bodies, server-sent events, and the ASGI guard
(body size, API key, request limits, admission limit) that every engine's app shares."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmflow_ray.credentials import Secret


class APIError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, kind=self.kind, param=self.param, code=self.code)


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Request(BaseModel):
    # Clients send fields we do not use (user, logit_bias, ...): accept and ignore them, as OpenAI does.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 non-empty stop strings")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> dict[str, Any]:
        """OpenAI messages -> the dataset's conversation shape (one leading system prompt)."""
        messages = list(self.messages)
        system = None
        if messages[0].role in ("system", "developer"):
            system = messages.pop(0).text()
        for i, m in enumerate(messages):
            if m.role in ("system", "developer"):
                raise APIError(400, "a system message may only come first", param=f"messages[{i + (system is not None)}].role")
        if not messages or messages[-1].role != "user":
            raise APIError(400, "the last message must come from the user", param="messages")
        conv: dict[str, Any] = {"messages": [{"role": m.role, "content": m.text()} for m in messages]}
        if system is not None:
            conv["system"] = system
        return conv


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    def token_limit(self) -> int | None:
        return self.max_tokens

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (send several requests; they are batched)")
            return value[0]
        if value == [] or value == "":
            raise ValueError("the prompt is empty")
        return value


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Bytes -> a request, or an APIError(400) that names the first bad field."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, message, param=param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def model_card(name: str, parent: str | None = None) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lmflow-ray",
            "root": parent or name, "parent": parent}


def bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


async def send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, enforced in front of every engine (serve section keys)."""

    max_new_tokens: int = 256
    max_n: int = 1
    max_request_bytes: int = 1 << 20
    max_stop_chars: int = 256
    fill_max_tokens: bool = False  # set max_tokens to the cap when a request leaves it out (vLLM)

    @classmethod
    def from_section(cls, section: Any, fill_max_tokens: bool = False) -> "Limits":
        return cls(section.max_new_tokens, section.max_n, section.max_request_bytes, section.max_stop_chars,
                   fill_max_tokens)


GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions")
OPEN_ROUTES = ("/", "/health")


def check_limits(body: Any, limits: Limits) -> Any:
    """A generation request's JSON checked against ``limits`` (APIError 400 for the first field
    past one); returns the body, with max_tokens filled in when ``limits.fill_max_tokens``. Fields
    of the wrong type are left for the engine's own validation to name."""
    if not isinstance(body, dict):
        return body
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_new_tokens:
            raise APIError(400, f"{key} is {value}, above this server's cap of {limits.max_new_tokens}", param=key)
    for key in ("n", "best_of"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limits.max_n:
            raise APIError(400, f"{key} is {value}, above this server's cap of {limits.max_n} (serve.max_n)", param=key)
    stops = body.get("stop")
    for stop in [stops] if isinstance(stops, str) else stops if isinstance(stops, list) else []:
        if isinstance(stop, str) and len(stop) > limits.max_stop_chars:
            raise APIError(400, f"stop strings are limited to {limits.max_stop_chars} characters", param="stop")
    if limits.fill_max_tokens and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body = {**body, "max_tokens": limits.max_new_tokens}
    return body


def route_of(scope: dict) -> str:
    """The path inside the application: Ray Serve keeps the route prefix in ``path`` and also sets
    ``root_path``, so a guard that looked at ``path`` alone would miss ``/PREFIX/v1/...``."""
    path, root = scope.get("path", ""), scope.get("root_path", "") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):]
    return path or "/"


class Guard:
    """ASGI middleware in front of every route but the page at ``/`` and ``/health``:

    * a body over ``max_request_bytes`` gets 413 (by its Content-Length, or counted as it arrives);
    * with an API key set, a request without ``Authorization: Bearer KEY`` gets 401;
    * generation requests past the limits (max_tokens, n, stop length) get 400;
    * at most ``limit`` requests run at once in this replica; one more gets 503 with Retry-After
      at once, instead of waiting in a queue that has no bound.
    """

    def __init__(self, app: Any, api_key: Secret | str | None, limit: int, limits: Limits | None = None,
                 retry_after_s: int = 1):
        self.app, self.api_key, self.limit, self.retry_after_s = app, api_key, limit, retry_after_s
        self.limits = limits or Limits()
        self.in_flight = 0

    async def _key(self) -> str | None:
        if isinstance(self.api_key, Secret):
            return await self.api_key.reveal_async()
        return self.api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = route_of(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or route in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            return await send_json(send, 400, error_body("the Content-Length header is not a number"))
        if int(length) > self.limits.max_request_bytes:
            return await self._too_large(send)
        key = await self._key()
        if key is not None and not hmac.compare_digest((bearer_key(scope["headers"]) or "").encode(), key.encode()):
            return await send_json(send, 401, error_body(
                "missing or wrong API key: send 'Authorization: Bearer <key>'", kind="authentication_error",
                code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
        if self.in_flight >= self.limit:
            return await send_json(send, 503, error_body(
                f"the server is at its limit of {self.limit} concurrent requests; retry shortly",
                kind="server_overloaded", code="overloaded"), {"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await _read_body(receive, self.limits.max_request_bytes)
                if body is None:
                    return await self._too_large(send)
                if scope["method"] == "POST" and route in GENERATION_ROUTES:
                    try:
                        parsed = json.loads(body)
                        checked = check_limits(parsed, self.limits)
                    except APIError as err:
                        return await send_json(send, err.status, err.body(), err.headers)
                    except ValueError:  # not JSON: the route's own parser answers 400
                        parsed = checked = None
                    if checked is not parsed:  # max_tokens filled in
                        body = json.dumps(checked).encode()
                scope, receive = _with_body(scope, receive, body)
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _too_large(self, send: Any) -> None:
        await send_json(send, 413, error_body(
            f"the request body is over this server's limit of {self.limits.max_request_bytes} bytes "
            "(serve.max_request_bytes)", code="request_too_large"))


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes (the rest is never read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _with_body(scope: dict, receive: Any, body: bytes) -> tuple[dict, Any]:
    """The request again, with ``body`` as its one message (and its Content-Length)."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    given = False

    async def replay() -> dict:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return {**scope, "headers": headers}, replay
