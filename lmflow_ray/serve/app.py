"""build_app(recipe) -> a Ray Serve application: the OpenAI API, a web chat page at `/`, /health,
an optional API key and an admission limit, on the vLLM engine (Ray Serve LLM) or the
transformers engine; autoscaling from the recipe.

``serve run lmflow_ray.serve.app:app_builder recipe=jobs/serve_default.yaml`` and the files in
serve_apps/ use ``app_builder``; ``lmflow-ray serve`` calls ``build_app``.
"""

# No `from __future__ import annotations` here: the deployment class travels to replicas by value,
# and FastAPI must see real types (Request) on its handlers, not strings to look up there.
import time
from typing import Any

from fastapi import Request

from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.serve import sources as model_sources
from lmflow_ray.serve.engines import Sampling, choose_engine
from lmflow_ray.serve.front import deployment_options, front
from lmflow_ray.serve.openai_api import (
    APIError, ChatRequest, CompletionRequest, error_body, model_card, new_id, parse, sse, usage,
)

APP_NAME = "lmflow-ray"


# ---- the transformers engine ---------------------------------------------------------------------

def _transformers_deployment(recipe: Recipe, sources: model_sources.Sources) -> Any:
    from fastapi.responses import StreamingResponse
    from ray import serve

    section = recipe.serve
    state: dict[str, Any] = {}
    app = front(section, lambda: state.get("describe", dict)())

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
                                         "joined_running_batch": self.engine.joined}

        def _adapter(self, model: str) -> str | None:
            if model == self.sources.base_name:
                return None
            if model in self.sources.adapters:
                return model
            raise APIError(404, f"the model {model!r} does not exist here; served: {', '.join(self.sources.names())}",
                           param="model", code="model_not_found")

        def _sampling(self, request: ChatRequest | CompletionRequest, prompt_len: int, prompt_field: str) -> Sampling:
            limit, context = request.token_limit(), self.engine.context_length  # the guard enforced the cap
            room = context - prompt_len
            if room < 1 or (limit is not None and limit > room):
                raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                                    f"{prompt_len} and {limit or 1} more were asked for", param=prompt_field,
                               code="context_length_exceeded")
            return Sampling(max_tokens=limit or min(self.cap, room), temperature=request.temperature,
                            top_p=request.top_p, stops=request.stops(), seed=request.seed)

        @app.get("/v1/models")
        async def models(self) -> dict[str, Any]:
            cards = [model_card(self.sources.base_name)]
            cards += [model_card(name, self.sources.base_name) for name in self.sources.adapters]
            return {"object": "list", "data": cards}

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request) -> Any:
            req = parse(ChatRequest, await request.body())
            adapter = self._adapter(req.model)
            try:
                ids = self.engine.encode_chat(req.conversation())
            except UserError as err:
                raise APIError(400, str(err), param="messages") from None
            sampling = self._sampling(req, len(ids), "messages")
            rid, created = new_id("chatcmpl"), int(time.time())
            head = {"id": rid, "created": created, "model": req.model}
            if req.stream:
                return StreamingResponse(self._chat_events(head, ids, sampling, adapter, req.include_usage()),
                                         media_type="text/event-stream")
            done = await self.engine.complete(ids, sampling, adapter)
            return {**head, "object": "chat.completion", "usage": usage(len(ids), done.completion_tokens),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                 "finish_reason": done.finish_reason, "logprobs": None}]}

        async def _chat_events(self, head, ids, sampling, adapter, with_usage):
            chunk = {**head, "object": "chat.completion.chunk"}

            def choice(delta, finish=None):
                return {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

            yield sse(choice({"role": "assistant", "content": ""}))
            async for piece in self._pieces(ids, sampling, adapter):
                if isinstance(piece, dict):
                    yield sse(piece)
                    return
                if piece.text:
                    yield sse(choice({"content": piece.text}))
                if piece.finish_reason:
                    yield sse(choice({}, piece.finish_reason))
                    if with_usage:
                        yield sse({**chunk, "choices": [], "usage": usage(len(ids), piece.completion_tokens)})
            yield sse("[DONE]")

        async def _pieces(self, ids, sampling, adapter):
            """The engine's pieces; a failure mid-stream becomes one error event (headers are gone)."""
            try:
                async for piece in self.engine.stream(ids, sampling, adapter):
                    yield piece
            except RuntimeError as err:
                yield error_body(str(err), kind="server_error")

        @app.post("/v1/completions")
        async def completions(self, request: Request) -> Any:
            req = parse(CompletionRequest, await request.body())
            adapter = self._adapter(req.model)
            if isinstance(req.prompt, list):
                vocab = len(self.engine.tokenizer)
                if any(not isinstance(t, int) or not 0 <= t < vocab for t in req.prompt):
                    raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
                ids = list(req.prompt)
            else:
                ids = self.engine.encode_text(req.prompt)
            sampling = self._sampling(req, len(ids), "prompt")
            head = {"id": new_id("cmpl"), "created": int(time.time()), "model": req.model, "object": "text_completion"}
            prefix = (req.prompt if isinstance(req.prompt, str) else self.engine.tokenizer.decode(ids)) if req.echo else ""
            if req.stream:
                return StreamingResponse(self._completion_events(head, ids, sampling, adapter, prefix, req.include_usage()),
                                         media_type="text/event-stream")
            done = await self.engine.complete(ids, sampling, adapter)
            return {**head, "usage": usage(len(ids), done.completion_tokens),
                    "choices": [{"index": 0, "text": prefix + done.text, "finish_reason": done.finish_reason, "logprobs": None}]}

        async def _completion_events(self, head, ids, sampling, adapter, prefix, with_usage):
            def choice(text, finish=None):
                return {**head, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

            if prefix:
                yield sse(choice(prefix))
            async for piece in self._pieces(ids, sampling, adapter):
                if isinstance(piece, dict):
                    yield sse(piece)
                    return
                yield sse(choice(piece.text, piece.finish_reason))
                if piece.finish_reason and with_usage:
                    yield sse({**head, "choices": [], "usage": usage(len(ids), piece.completion_tokens)})
            yield sse("[DONE]")

    return TransformersServer.bind(recipe.model_dump_json(), sources)


# ---- entry points ----------------------------------------------------------------------------------

def build_app(recipe: Recipe) -> Any:
    """The Serve application for a recipe (the model, adapters and serve section)."""
    engine = choose_engine(recipe.serve.engine)
    sources = model_sources.resolve(recipe)
    if engine == "vllm":
        from lmflow_ray.serve.vllm_app import build_vllm_app

        return build_vllm_app(recipe, sources)
    return _transformers_deployment(recipe, sources)


def app_builder(args: dict[str, Any]) -> Any:
    """For `serve run` / `serve deploy` / a RayService: ``args`` holds the recipe inline (sections
    such as ``model`` and ``serve``), or ``recipe: PATH`` to a YAML file, or both (inline wins)."""
    from lmflow_ray.config import load_recipe

    args = dict(args or {})
    path = args.pop("recipe", None)
    return build_app(load_recipe(path, inline=args))
