"""What a deployment serves: one base model and LoRA adapters on top, named as clients ask for
them, from local folders, checkpoints in object storage, or `default` (the embedded model)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field

from lmflow_ray import storage
from lmflow_ray.config import Recipe
from lmflow_ray.embedded import DEFAULT_NAME, cache_home, resolve_model_path
from lmflow_ray.errors import UserError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_READY = ".lmflow_ray_complete"


@dataclass
class Sources:
    """Names and exact URIs (checkpoint runs already resolved to one checkpoint, so every replica
    serves the same one). ``adapters`` maps ``BASE:ADAPTER`` (Ray Serve LLM's naming) to a URI."""

    base_name: str
    base_uri: str
    adapters: dict[str, str] = field(default_factory=dict)
    s3: dict | None = None

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def served_name(uri: str) -> str:
    """A readable model name from a URI: a run's name for its checkpoints, else the folder name."""
    if uri == DEFAULT_NAME:
        return EMBEDDED_NAME
    parts = [p for p in re.split(r"[/\\]+", uri.split("://", 1)[-1]) if p]
    while len(parts) > 1 and (parts[-1] == storage.EXPORT_DIR or parts[-1].startswith(storage.CHECKPOINT_PREFIX)):
        parts.pop()
    return parts[-1] if parts else uri


def _is_adapter(uri: str, s3: dict | None) -> bool:
    fs, path = storage.filesystem(uri, s3)
    return fs.get_file_info(f"{path}/adapter_config.json").type.name == "File"


def _adapter_base(uri: str, s3: dict | None) -> str | None:
    fs, path = storage.filesystem(uri, s3)
    with fs.open_input_stream(f"{path}/adapter_config.json") as f:
        return json.loads(f.read()).get("base_model_name_or_path")


def _exact(uri: str, s3: dict | None, key: str) -> str:
    if uri == DEFAULT_NAME:
        return uri
    if not storage.is_remote(uri) and not os.path.isdir(uri):
        raise UserError(f"{key}: {uri!r} is not a folder here (give a model folder, a checkpoint or run URI, or `default`)")
    return storage.export_uri(uri if storage.is_remote(uri) else os.path.abspath(uri), s3)


def resolve(recipe: Recipe) -> Sources:
    """The recipe's model (and serve.lora_adapters) as exact URIs and served names."""
    s3 = storage.S3Options.resolve(recipe.storage).to_dict()
    source = recipe.model.model_name_or_path
    uri = _exact(source, s3, "model.model_name_or_path")
    adapters: dict[str, str] = {}
    base_uri, adapter_name = uri, None
    if uri != DEFAULT_NAME and _is_adapter(uri, s3):
        base = _adapter_base(uri, s3)
        if not base:
            raise UserError(f"{uri}/adapter_config.json: no base_model_name_or_path to serve the adapter on")
        base_uri, adapter_name = _exact(base, s3, f"{uri}/adapter_config.json: base_model_name_or_path"), served_name(source)
    base_name = recipe.serve.served_model_name or served_name(base_uri if adapter_name else source)
    if adapter_name:
        adapters[f"{base_name}:{adapter_name}"] = uri
    for name, adapter_source in (recipe.serve.lora_adapters or {}).items():
        key = f"serve.lora_adapters.{name}"
        adapter_uri = _exact(adapter_source, s3, key)
        if adapter_uri == DEFAULT_NAME or not _is_adapter(adapter_uri, s3):
            raise UserError(f"{key}: {adapter_source!r} is not a LoRA adapter (no adapter_config.json)")
        adapters[f"{base_name}:{name}"] = adapter_uri
    return Sources(base_name, base_uri, adapters, s3)


def _fingerprint(uri: str, s3: dict | None) -> str:
    """Names the cached copy by the URI and what is there now (paths, sizes, times): new content
    under the same URI is downloaded again, never served stale."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri, s3)
    listing = sorted((i.path, i.size, str(i.mtime)) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    return hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]


def local_folder(uri: str, s3: dict | None) -> str:
    """A local folder for an exact URI; remote ones are downloaded once into the cache (atomically,
    so a download cut short is never taken for a model)."""
    if uri == DEFAULT_NAME:
        return resolve_model_path(uri)
    if not storage.is_remote(uri):
        return uri
    target = cache_home() / "served" / _fingerprint(uri, s3)
    if (target / _READY).exists():
        return str(target)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        storage.download(uri, tmp, s3)
        (tmp / _READY).write_text(uri)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
