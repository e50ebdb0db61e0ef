"""Where a model is: a folder, a training run or checkpoint (local or in object storage), a
Hugging Face hub id, or `default` (the embedded model), pinned to one exact URI and fetched into
a local folder once per node. Train, eval, serve and merge all find their models here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from lmflow_ray import storage
from lmflow_ray.embedded import DEFAULT_NAME, cache_home, resolve_model_path
from lmflow_ray.errors import UserError

_READY = ".lmflow_ray_complete"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def display_name(uri: str) -> str:
    """A readable model name from a URI: a run's name for its checkpoints, else the folder name."""
    if uri == DEFAULT_NAME:
        return EMBEDDED_NAME
    parts = [p for p in re.split(r"[/\\]+", uri.split("://", 1)[-1]) if p]
    while len(parts) > 1 and (parts[-1] == storage.EXPORT_DIR or parts[-1].startswith(storage.CHECKPOINT_PREFIX)):
        parts.pop()
    return parts[-1] if parts else uri


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(uri: str) -> bool:
    """`org/name` (or `name`) that is no path here: a Hugging Face hub id, which transformers
    resolves from its cache or the hub (offline here, so it fails there with its own message)."""
    return (uri != DEFAULT_NAME and not storage.is_remote(uri) and _HUB_ID.fullmatch(uri) is not None
            and not os.path.exists(uri.split("/", 1)[0]))


def exact_uri(uri: str, s3: dict | None, key: str) -> str:
    """A run means its newest complete checkpoint's export, a checkpoint its export folder; `key`
    names the recipe field in the error when there is nothing there."""
    if uri == DEFAULT_NAME or is_hub_id(uri):
        return uri
    if not storage.is_remote(uri) and not os.path.isdir(uri):
        raise UserError(f"{key}: {uri!r} is not a folder here (give a model folder, a checkpoint or run URI, a "
                        "Hugging Face hub id, or `default`)")
    return storage.export_uri(uri if storage.is_remote(uri) else os.path.abspath(uri), s3)


def is_adapter(uri: str, s3: dict | None) -> bool:
    if uri == DEFAULT_NAME or is_hub_id(uri):
        return False
    fs, path = storage.filesystem(uri, s3)
    return fs.get_file_info(f"{path}/adapter_config.json").type.name == "File"


def adapter_base(uri: str, s3: dict | None) -> str | None:
    fs, path = storage.filesystem(uri, s3)
    with fs.open_input_stream(f"{path}/adapter_config.json") as f:
        return json.loads(f.read()).get("base_model_name_or_path")


def split_adapter(uri: str, s3: dict | None) -> tuple[str, str | None]:
    """(base model URI, adapter URI or None) for an exact URI: a LoRA export stands on its base."""
    if not is_adapter(uri, s3):
        return uri, None
    base = adapter_base(uri, s3)
    if not base:
        raise UserError(f"{uri}/adapter_config.json: no base_model_name_or_path to load the adapter on")
    return exact_uri(base, s3, f"{uri}/adapter_config.json: base_model_name_or_path"), uri


def fingerprint(uri: str, s3: dict | None) -> str:
    """Names the cached copy by the URI and what is there now (paths, sizes, times): new content
    under the same URI is downloaded again, never used stale."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri, s3)
    listing = sorted((i.path, i.size, str(i.mtime)) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    return hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]


def local_folder(uri: str, s3: dict | None) -> str:
    """A local folder for an exact URI; remote ones are downloaded once into the cache. Replicas on
    one node take turns (a file lock): the first downloads into its own temporary folder and renames
    it into place, the others find it ready. A cached copy is never deleted while in use."""
    import fcntl
    import uuid

    if uri == DEFAULT_NAME:
        return resolve_model_path(uri)
    if not storage.is_remote(uri):
        return uri
    target = cache_home() / "served" / fingerprint(uri, s3)
    if (target / _READY).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f"{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (target / _READY).exists():
            return str(target)
        tmp = target.with_name(f"{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
        try:
            storage.download(uri, tmp, s3)
            (tmp / _READY).write_text(uri)
            if target.exists():  # a copy cut short by a crash (no ready mark): nobody can be using it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def model_folder(name_or_uri: str, s3: dict | None = None, key: str = "model.model_name_or_path") -> str:
    """A local folder (or hub id) with the whole model ``name_or_uri`` stands for, for training on
    it: a run or checkpoint means its export, object storage is fetched once per node. A LoRA
    adapter is no whole model and is refused with what to do instead."""
    uri = exact_uri(name_or_uri, s3, key)
    if is_adapter(uri, s3):
        raise UserError(f"{key}: {name_or_uri!r} is a LoRA adapter, not a whole model; give its base model, or merge "
                        "it first (lmflow-ray merge --lora_model_path ADAPTER --output_model_path FOLDER)")
    return local_folder(uri, s3)
