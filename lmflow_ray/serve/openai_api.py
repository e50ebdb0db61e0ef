"""The OpenAI wire format: request schemas, error bodies, server-sent events, and the ASGI guard
(body size, API key, request limits, admission limit) that every engine's app shares."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

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


INT64 = (-(1 << 63), (1 << 63) - 1)


class _Request(BaseModel):
    # Clients send fields we do not use (user, logit_bias, ...): accept and ignore them, as OpenAI does.
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="choices per prompt (at most serve.max_n)")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """None: no log-probs; k >= 0: the chosen token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

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
    # A string, several strings, a token-id list, or several token-id lists (lm-eval's default).
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def token_limit(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if value == [] or value == "":
            raise ValueError("the prompt is empty")
        if isinstance(value, list):
            for i, one in enumerate(value):
                if one == "" or one == []:
                    raise ValueError(f"prompt {i} is empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Every prompt in the request, in order: each one a string or a token-id list."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


def load_json(raw: bytes) -> Any:
    """A request body's JSON, or an APIError(400): not JSON, nested past what a parser may recurse,
    numbers too long to convert, NaN / Infinity (not JSON), or text with a lone UTF-16 surrogate
    (not Unicode: no tokenizer can take it)."""
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise APIError(400, "the body is not valid JSON here: it is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, and ints past the digit limit
        raise APIError(400, f"the body is not valid JSON ({err})") from None
    where = _surrogate(data)
    if where is not None:
        raise APIError(400, f"{where or 'the body'}: the text holds a lone UTF-16 surrogate, which is not "
                            "valid Unicode", param=where or None)
    return data


def _surrogate(data: Any) -> str | None:
    """The dotted path of the first string (or key) that is not valid Unicode, or None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                child = f"{path}.{k}" if path else str(k)
                stack.append((child, k))
                stack.append((child, v))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    return None


def validate(model: type[BaseModel], data: Any) -> Any:
    """Parsed JSON -> a request, or an APIError(400) that names the first bad field."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _union_tag(p)) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, message, param=param) from None


def _union_tag(part: Any) -> bool:
    """Pydantic names the member of a union it tried (``str``, ``list[int]``, ...) in an error's
    location: not a field."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("function-"))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Bytes -> a request, or an APIError(400) that names the first bad field."""
    return validate(model, load_json(raw))


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
    max_prompts: int = 32
    fill_max_tokens: bool = False  # set max_tokens to the cap when a request leaves it out (vLLM)
    no_prompt_logprobs: str | None = None  # why prompt log-probs cannot be given here, if they cannot

    @classmethod
    def from_section(cls, section: Any, fill_max_tokens: bool = False, no_prompt_logprobs: str | None = None) -> "Limits":
        return cls(section.max_new_tokens, section.max_n, section.max_request_bytes, section.max_stop_chars,
                   section.max_prompts, fill_max_tokens, no_prompt_logprobs)


GENERATION_ROUTES = {"/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}
OPEN_ROUTES = ("/", "/health")


def check_limits(body: Any, limits: Limits) -> Any:
    """A generation request's JSON checked against ``limits`` (APIError 400 for the first field
    past one); returns the body, with max_tokens filled in when ``limits.fill_max_tokens``. Fields
    of the wrong type are left for the request's validation to name."""
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
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > limits.max_prompts:
        raise APIError(400, f"prompt: {len(prompt)} prompts in one request, above this server's cap of "
                            f"{limits.max_prompts} (serve.max_prompts)", param="prompt")
    if limits.no_prompt_logprobs:
        if body.get("prompt_logprobs") is not None:  # vLLM's own field
            raise APIError(400, f"prompt_logprobs: {limits.no_prompt_logprobs}", param="prompt_logprobs")
        if body.get("echo") is True and body.get("logprobs") not in (None, False):
            raise APIError(400, f"echo with logprobs: {limits.no_prompt_logprobs}", param="echo")
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


REQUEST_STATE = "lmflow_ray_request"  # where the guard leaves the validated request (request.state)


class Guard:
    """ASGI middleware in front of every route but the page at ``/`` and ``/health``:

    * a body over ``max_request_bytes`` gets 413 (by its Content-Length, or counted as it arrives);
    * with an API key set, a request without ``Authorization: Bearer KEY`` gets 401;
    * a generation request is parsed and validated here, for every engine alike: bad JSON, a bad
      field, values past the limits (max_tokens, n, stop length, prompts) get 400 naming the field,
      and a model that is not served gets 404; the validated request is left in the scope's state;
    * at most ``limit`` requests run at once in this replica; one more gets 503 with Retry-After
      at once, instead of waiting in a queue that has no bound.
    """

    def __init__(self, app: Any, api_key: Secret | str | None, limit: int, limits: Limits | None = None,
                 retry_after_s: int = 1, models: Any = None):
        self.app, self.api_key, self.limit, self.retry_after_s = app, api_key, limit, retry_after_s
        self.limits = limits or Limits()
        self.models = list(models) if models is not None else None  # the served names (None: not checked)
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
            return await send_json(send, 503, overloaded_body(self.limit), {"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await _read_body(receive, self.limits.max_request_bytes)
                if body is None:
                    return await self._too_large(send)
                schema = GENERATION_ROUTES.get(route) if scope["method"] == "POST" else None
                if schema is not None:
                    try:
                        parsed = load_json(body)
                        checked = check_limits(parsed, self.limits)
                        request = validate(schema, checked)
                        self._check_model(request.model)
                    except APIError as err:
                        return await send_json(send, err.status, err.body(), err.headers)
                    if checked is not parsed:  # max_tokens filled in
                        body = json.dumps(checked).encode()
                    scope = {**scope, "state": {**scope.get("state", {}), REQUEST_STATE: request}}
                scope, receive = _with_body(scope, receive, body)
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise APIError(404, f"the model {model!r} does not exist here; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")

    async def _too_large(self, send: Any) -> None:
        await send_json(send, 413, error_body(
            f"the request body is over this server's limit of {self.limits.max_request_bytes} bytes "
            "(serve.max_request_bytes)", code="request_too_large"))


def overloaded_body(limit: int | None = None) -> dict[str, Any]:
    what = f"its limit of {limit} concurrent requests" if limit else "capacity"
    return error_body(f"the server is at {what}; retry shortly", kind="server_overloaded", code="overloaded")


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


# ---- the OpenAPI document ------------------------------------------------------------------------

def openapi_document(limits: Limits, models: list[str], title: str = "lmflow-ray") -> dict[str, Any]:
    """The OpenAPI 3.1 description of what this server answers, with the request schemas the
    guard validates and this server's own caps (max_tokens, n, prompts) and model names in them."""
    components: dict[str, Any] = {"ErrorBody": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}

    def schema_of(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        props = schema["properties"]
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                _bound(props[key], "maximum", limits.max_new_tokens)
        _bound(props["n"], "maximum", limits.max_n)
        props["model"] = {"type": "string", "enum": list(models)} if models else props["model"]
        if "prompt" in props:
            for option in props["prompt"]["anyOf"]:
                if option.get("type") == "array":
                    option.update(minItems=1, maxItems=limits.max_prompts)
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    errors = {str(code): {"description": why, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
        for code, why in [(400, "a bad request (the field is named)"), (401, "no or a wrong API key"),
                          (404, "a model that is not served"), (413, "the body is too large"),
                          (503, "at the concurrency limit (Retry-After)")]}

    def generation(model: type[BaseModel], summary: str) -> dict[str, Any]:
        return {"post": {"summary": summary, "security": [{"bearer": []}],
                         "requestBody": {"required": True, "content": {"application/json": {"schema": schema_of(model)}}},
                         "responses": {"200": {"description": "the completion, or server-sent events when stream is true",
                                               "content": {"application/json": {"schema": {"type": "object"}},
                                                           "text/event-stream": {"schema": {"type": "string"}}}},
                                       **errors}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1", "description": "The OpenAI-compatible API of an lmflow-ray server."},
        "paths": {
            "/v1/chat/completions": generation(ChatRequest, "Chat completion"),
            "/v1/completions": generation(CompletionRequest, "Text completion"),
            "/v1/models": {"get": {"summary": "The served models", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "the model list",
                                                         "content": {"application/json": {"schema": {"type": "object"}}}},
                                                 "401": errors["401"]}}},
            "/health": {"get": {"summary": "Liveness (no key needed)", "responses": {"200": {
                "description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _bound(prop: dict[str, Any], key: str, value: int) -> None:
    """Put a bound on a field's integer schema (directly, or the integer member of an anyOf)."""
    for option in prop.get("anyOf", [prop]):
        if option.get("type") == "integer":
            option[key] = value
