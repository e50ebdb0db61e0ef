"""What a deployment serves: one base model and LoRA adapters on top, named as clients ask for
them, from local folders, checkpoints in object storage, or `default` (the embedded model)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.model.locate import EMBEDDED_NAME, exact_uri, is_adapter, local_folder, split_adapter  # noqa: F401 (re-exported)
from lmflow_ray.model.locate import display_name as served_name


@dataclass
class Sources:
    """Names and exact URIs (checkpoint runs already resolved to one checkpoint, so every replica
    serves the same one). ``adapters`` maps ``BASE:ADAPTER`` (Ray Serve LLM's naming) to a URI."""

    base_name: str
    base_uri: str
    adapters: dict[str, str] = field(default_factory=dict)
    s3: dict | None = None
    draft_uri: str | None = None  # speculative decoding's draft model

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def resolve(recipe: Recipe) -> Sources:
    """The recipe's model (and serve.lora_adapters) as exact URIs and served names."""
    s3 = storage.S3Options.resolve(recipe.storage).to_dict()
    source = recipe.model.model_name_or_path
    uri = exact_uri(source, s3, "model.model_name_or_path")
    adapters: dict[str, str] = {}
    base_uri, adapter = split_adapter(uri, s3)
    adapter_name = served_name(source) if adapter else None
    base_name = recipe.serve.served_model_name or served_name(base_uri if adapter_name else source)
    if adapter_name:
        adapters[f"{base_name}:{adapter_name}"] = uri
    for name, adapter_source in (recipe.serve.lora_adapters or {}).items():
        key = f"serve.lora_adapters.{name}"
        adapter_uri = exact_uri(adapter_source, s3, key)
        if not is_adapter(adapter_uri, s3):
            raise UserError(f"{key}: {adapter_source!r} is not a LoRA adapter (no adapter_config.json)")
        adapters[f"{base_name}:{name}"] = adapter_uri
    spec = recipe.serve.speculative_config
    draft_uri = None
    if spec is not None and spec.method == "draft_model":
        key = "serve.draft_model" if recipe.serve.draft_model else "serve.speculative_config.model"
        draft_uri = exact_uri(spec.model, s3, key)
        if is_adapter(draft_uri, s3):
            raise UserError(f"{key}: {spec.model!r} is a LoRA adapter; a draft must be a whole model: merge it first "
                            f"(lmflow-ray merge --lora_model_path {spec.model} --output_model_path DRAFT)")
    return Sources(base_name, base_uri, adapters, s3, draft_uri)
