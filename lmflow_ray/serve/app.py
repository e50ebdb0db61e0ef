"""build_app(recipe) -> a Ray Serve application: the OpenAI API, a web chat page at `/`, /health,
an optional API key and an admission limit, on the vLLM engine (Ray Serve LLM) or the
transformers engine; autoscaling from the recipe.

``serve run lmflow_ray.serve.app:app_builder recipe=jobs/serve_default.yaml`` and the files in
serve_apps/ use ``app_builder``; ``lmflow-ray serve`` calls ``plan_app`` before it connects.
"""

# No `from __future__ import annotations` here: the deployment class travels to replicas by value,
# and FastAPI must see real types (Request) on its handlers, not strings to look up there.
import asyncio
import time
from typing import Any, Callable

from fastapi import Request

from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.serve import sources as model_sources
from lmflow_ray.serve.engines import Sampling, choose_engine
from lmflow_ray.serve.front import deployment_options, front
from lmflow_ray.serve.openai_api import (
    REQUEST_STATE, APIError, ChatRequest, CompletionRequest, error_body, model_card, new_id, parse, sse, usage,
)

APP_NAME = "lmflow-ray"


# ---- the transformers engine ---------------------------------------------------------------------

def _transformers_deployment(recipe: Recipe, sources: model_sources.Sources) -> Any:
    from fastapi.responses import StreamingResponse
    from ray import serve

    section = recipe.serve
    state: dict[str, Any] = {}
    app = front(section, lambda: state.get("describe", dict)(), sources.names())

    @serve.deployment(name="LLMServer", **deployment_options(section))
    @serve.ingress(app)
    class TransformersServer:
        def __init__(self, recipe_json: str, sources: model_sources.Sources):
            from lmflow_ray.serve.engines import TransformersEngine

            self.recipe = Recipe.model_validate_json(recipe_json)
            self.sources = sources
            self.cap = self.recipe.serve.max_new_tokens
            threads = max(1, int(self.recipe.serve.num_cpus_per_replica))
            self.engine = TransformersEngine.from_recipe(self.recipe, sources, threads=threads)
            state["describe"] = lambda: {"engine": "transformers", "models": sources.names(),
                                         "prefills": self.engine.batches, "requests": self.engine.rows,
                                         "joined_running_batch": self.engine.joined,
                                         **({"speculative": spec} if (spec := self.engine.speculation()) else {}),
                                         **({"prefix_cache": pc} if (pc := self.engine.prefix_caching()) else {})}

        def _adapter(self, model: str) -> str | None:
            if model == self.sources.base_name:
                return None
            if model in self.sources.adapters:
                return model
            raise APIError(404, f"the model {model!r} does not exist here; served: {', '.join(self.sources.names())}",
                           param="model", code="model_not_found")

        def _sampling(self, request: Any, prompt_len: int, prompt_field: str, choice: int = 0,
                      echo: bool = False) -> Sampling:
            limit, context = request.token_limit(), self.engine.context_length  # the guard enforced the cap
            room = context - prompt_len
            if room < 1 or (limit is not None and limit > room):
                raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                    f"{prompt_len} and {limit or 1} more were asked for", param=prompt_field,
                               code="context_length_exceeded")
            seed = None if request.seed is None else request.seed + choice  # n choices differ, each reproducible
            k = request.logprob_count()
            return Sampling(max_tokens=limit or min(self.cap, room), temperature=request.temperature,
                            top_p=request.top_p, stops=request.stops(), seed=seed, logprobs=k,
                            prompt_logprobs=k if echo and k is not None else None)

        @app.get("/v1/models")
        async def models(self) -> dict[str, Any]:
            cards = [model_card(self.sources.base_name)]
            cards += [model_card(name, self.sources.base_name) for name in self.sources.adapters]
            return {"object": "list", "data": cards}

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request) -> Any:
            req = await _request(request, ChatRequest)
            adapter = self._adapter(req.model)
            try:  # rendering and tokenizing a long conversation must not hold up the event loop
                ids = await asyncio.to_thread(self.engine.encode_chat, req.conversation())
            except UserError as err:
                raise APIError(400, str(err), param="messages") from None
            runs = [(ids, self._sampling(req, len(ids), "messages", i)) for i in range(req.n)]
            head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": req.model}
            tok = self.engine.tokenizer
            if req.stream:
                return StreamingResponse(stream_events(self.engine, runs, adapter, _ChatShape(head, tok), req.include_usage()),
                                         media_type="text/event-stream")
            done = await self._complete_all(runs, adapter)
            shape = _ChatShape(head, tok)
            return {**head, "object": "chat.completion",
                    "usage": usage(len(ids), sum(d.completion_tokens for d in done)),
                    "choices": [shape.whole(i, d) for i, d in enumerate(done)]}

        @app.post("/v1/completions")
        async def completions(self, request: Request) -> Any:
            req = await _request(request, CompletionRequest)
            adapter = self._adapter(req.model)
            vocab = len(self.engine.tokenizer)
            given, prompts = req.prompts(), []
            for p, prompt in enumerate(given):
                field = "prompt" if len(given) == 1 else f"prompt.{p}"
                if isinstance(prompt, list):
                    if any(not 0 <= t < vocab for t in prompt):
                        raise APIError(400, f"{field}: token ids must lie in [0, {vocab})", param=field)
                    prompts.append((field, list(prompt)))
                else:
                    prompts.append((field, await asyncio.to_thread(self.engine.encode_text, prompt)))
            runs = [(ids, self._sampling(req, len(ids), field, i, echo=req.echo)) for field, ids in prompts
                    for i in range(req.n)]
            head = {"id": new_id("cmpl"), "created": int(time.time()), "model": req.model, "object": "text_completion"}
            texts = [p if isinstance(p, str) else None for p in given]
            shape = _CompletionShape(head, self.engine.tokenizer, [ids for _, ids in prompts], texts, req.n, req.echo)
            if req.stream:
                return StreamingResponse(stream_events(self.engine, runs, adapter, shape, req.include_usage()),
                                         media_type="text/event-stream")
            done = await self._complete_all(runs, adapter)
            return {**head, "usage": usage(shape.prompt_tokens(runs), sum(d.completion_tokens for d in done)),
                    "choices": [shape.whole(i, d) for i, d in enumerate(done)]}

        async def _complete_all(self, runs, adapter):
            try:
                return await asyncio.gather(*(self.engine.complete(ids, s, adapter) for ids, s in runs))
            except RuntimeError as err:
                raise APIError(500, str(err), kind="server_error") from None

    return TransformersServer.bind(recipe.model_dump_json(), sources)


async def stream_events(engine: Any, runs: list, adapter: str | None, shape: Any, with_usage: bool) -> Any:
    """Every choice's pieces as server-sent events, in the order they come; a failure once the
    stream has started is one error event, then [DONE], as for a finished stream."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ids: list[int], sampling: Sampling) -> None:
        try:
            async for piece in engine.stream(ids, sampling, adapter):
                await merged.put((index, piece))
        except Exception as err:  # noqa: BLE001 - the client gets it as an event
            await merged.put((index, err))
        finally:
            await merged.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, ids, s)) for i, (ids, s) in enumerate(runs)]
    try:
        for event in shape.opening(len(runs)):
            yield sse(event)
        open_runs, completion = len(runs), 0
        while open_runs:
            index, piece = await merged.get()
            if piece is None:
                open_runs -= 1
                continue
            if isinstance(piece, Exception):
                yield sse(error_body(f"generation failed: {piece}", kind="server_error"))
                break
            completion += piece.completion_tokens if piece.finish_reason else 0
            for event in shape.piece(index, piece):
                yield sse(event)
        else:
            if with_usage:
                yield sse({**shape.chunk_head, "choices": [], "usage": usage(shape.prompt_tokens(runs), completion)})
        yield sse("[DONE]")
    finally:
        for task in tasks:
            task.cancel()


async def _request(request: Request, schema: Any) -> Any:
    """The request the guard validated (it always has, in a served app), else parsed here."""
    found = getattr(request.state, REQUEST_STATE, None)
    return found if isinstance(found, schema) else parse(schema, await request.body())


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """A token's own bytes (OpenAI's ``bytes``): also for a token that is part of a character,
    which decodes alone to U+FFFD."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text.encode("utf-8")
    piece = tokenizer.convert_ids_to_tokens(token)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    stand_in = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE's printable stand-ins
    if all(c in stand_in for c in piece):
        return bytes(stand_in[c] for c in piece)
    return text.encode("utf-8")


class _ChatShape:
    """Chat completion choices, whole or as chunks, with OpenAI's ``logprobs.content`` entries."""

    def __init__(self, head: dict[str, Any], tokenizer: Any):
        self.head, self.tok = head, tokenizer
        self.chunk_head = {**head, "object": "chat.completion.chunk"}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.tok.decode([token]), "logprob": logprob, "bytes": list(token_bytes(self.tok, token))}

    def logprobs(self, entries: list | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        return {"content": [{**self._entry(t, lp), "top_logprobs": [self._entry(i, v) for i, v in top]}
                            for t, lp, top in entries], "refusal": None}

    def whole(self, index: int, done: Any) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": done.text},
                "finish_reason": done.finish_reason, "logprobs": self.logprobs(done.logprobs)}

    def opening(self, n: int) -> list[dict[str, Any]]:
        return [{**self.chunk_head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None, "logprobs": None}]} for i in range(n)]

    def piece(self, index: int, piece: Any) -> list[dict[str, Any]]:
        events = []
        if piece.text or piece.logprobs:
            events.append({**self.chunk_head, "choices": [{"index": index, "delta": {"content": piece.text},
                                                           "finish_reason": None, "logprobs": self.logprobs(piece.logprobs)}]})
        if piece.finish_reason:
            events.append({**self.chunk_head, "choices": [{"index": index, "delta": {},
                                                           "finish_reason": piece.finish_reason, "logprobs": None}]})
        return events

    def prompt_tokens(self, runs: list) -> int:
        return len(runs[0][0])


class _CompletionShape:
    """Completion choices (prompt p, choice j at index p * n + j), whole or streamed, with the legacy
    ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset; with echo the prompt's
    tokens come first, the very first with null log-probs (as OpenAI and vLLM give it)."""

    def __init__(self, head: dict[str, Any], tokenizer: Any, prompts: list[list[int]], texts: list[str | None],
                 n: int, echo: bool):
        self.head, self.chunk_head, self.tok, self.prompts, self.texts = head, head, tokenizer, prompts, texts
        self.n, self.echo = n, echo
        self.offsets: dict[int, int] = {}  # characters sent so far, per choice (text_offset)

    def prefix(self, index: int) -> str:
        if not self.echo:
            return ""
        p = index // self.n
        return self.texts[p] if self.texts[p] is not None else self.tok.decode(self.prompts[p])

    def logprobs(self, index: int, entries: list | None, prompt_entries: list | None = None) -> dict[str, Any] | None:
        if entries is None and prompt_entries is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        at = self.offsets.get(index, 0)
        if prompt_entries is not None:
            rows = [(self.prompts[index // self.n][0], None, None)] + [e for e in prompt_entries[1:]]
        else:
            rows = []
        for token, logprob, top in rows + list(entries or []):
            text = self.tok.decode([token])
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(None if top is None else {self.tok.decode([i]): v for i, v in top})
            out["text_offset"].append(at)
            at += len(text)
        self.offsets[index] = at
        return out

    def whole(self, index: int, done: Any) -> dict[str, Any]:
        return {"index": index, "text": self.prefix(index) + done.text, "finish_reason": done.finish_reason,
                "logprobs": self.logprobs(index, done.logprobs, done.prompt_logprobs)}

    def opening(self, n: int) -> list[dict[str, Any]]:
        return []

    def piece(self, index: int, piece: Any) -> list[dict[str, Any]]:
        text = piece.text
        if index not in self.offsets and self.echo:  # the first piece of this choice carries the echo
            text = self.prefix(index) + text
        logprobs = self.logprobs(index, piece.logprobs, piece.prompt_logprobs)
        self.offsets.setdefault(index, len(text))
        return [{**self.head, "choices": [{"index": index, "text": text, "finish_reason": piece.finish_reason,
                                           "logprobs": logprobs}]}]

    def prompt_tokens(self, runs: list) -> int:
        return sum(len(ids) for ids in self.prompts)


# ---- entry points ----------------------------------------------------------------------------------

def plan_app(recipe: Recipe) -> Callable[[], Any]:
    """Resolves the model, adapters and engine of a recipe without Ray (bad input fails before a
    cluster starts) and returns what binds the Serve application once Ray is connected."""
    engine = choose_engine(recipe.serve.engine)
    sources = model_sources.resolve(recipe)
    if engine == "vllm":
        from lmflow_ray.serve.vllm_app import plan_vllm_app

        return plan_vllm_app(recipe, sources)
    app = _transformers_deployment(recipe, sources)
    return lambda: app


def build_app(recipe: Recipe) -> Any:
    """The Serve application for a recipe (the model, adapters and serve section); Ray connected."""
    return plan_app(recipe)()


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run` / `serve deploy` / a RayService: ``args`` holds the recipe inline (sections
    such as ``model`` and ``serve``), or ``recipe: PATH`` to a YAML file, or both (inline wins)."""
    from lmflow_ray.config import load_recipe

    args = dict(args or {})
    path = args.pop("recipe", None)
    return build_app(load_recipe(path, inline=args))
