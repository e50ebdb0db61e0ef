"""GGUF export for llama.cpp: a model folder, run or checkpoint (local or s3://; a LoRA adapter is
merged into its base first) -> one ``.gguf`` file, quantized in Python with the ``gguf`` package.

What llama.cpp needs from the file, and where it comes from here:
- its architecture name and tensor names (``gguf.get_tensor_name_map``); Llama-architecture
  models (Llama, SmolLM2, Mistral) and Qwen2; anything else is refused before any work;
- the q/k projections in its RoPE layout: Llama's rows are permuted per head (the pairs that
  transformers rotates as halves become interleaved); Qwen2's are not;
- the hyperparameters, RoPE base and scaling (``rope_pi_ratio`` -> linear, ``rope_ntk_ratio`` is
  already in the base) and the norm epsilon from the config;
- the byte-level BPE vocabulary: tokens, merges, token types, special ids, whether a BOS is added,
  the chat template, and the pre-tokenizer that splits text the way the model's own tokenizer does.

Tensor types: 1-D tensors (norms, biases) stay F32; every matrix takes ``outtype``, except that the
4-bit types keep the embedding (and the output head) at Q8_0, as llama.cpp's own Q4 files do, and a
matrix whose rows are not whole 32-value blocks falls back to F16.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.errors import UserError

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
# architectures[0] of config.json -> llama.cpp's architecture and whether q/k rows are permuted
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
                 "Qwen2ForCausalLM": ("qwen2", False)}
GGUF_MAGIC = b"GGUF"


@dataclass
class GgufExport:
    path: str  # where the file went (local path or s3:// URI)
    architecture: str
    outtype: str
    tensors: dict[str, int] = field(default_factory=dict)  # tensor type name -> count
    bytes: int = 0
    merged_adapter: str | None = None


def check_target(target: str, s3: dict | None) -> None:
    """``target`` must name a ``.gguf`` file that is missing or an earlier GGUF file (which is
    replaced): never a folder, never another kind of file."""
    import pyarrow.fs as pafs

    if not target.endswith(".gguf"):
        raise UserError(f"--output_model_path: {target!r} must name a .gguf file")
    fs, path = storage.filesystem(target, s3)
    info = storage.retrying(target, lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory:
        raise UserError(f"--output_model_path: {target} is a folder; name a .gguf file")
    if info.type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            head = f.read(4)
        if head != GGUF_MAGIC:
            raise UserError(f"--output_model_path: {target} exists and is not a GGUF file; refusing to replace it "
                            "(name a new file, or remove that one yourself)")


def architecture(config: dict, where: str) -> tuple[str, bool]:
    names = config.get("architectures") or [config.get("model_type", "?")]
    found = ARCHITECTURES.get(names[0])
    if found is None:
        raise UserError(f"{where}/config.json: architectures {names[0]!r}: GGUF export writes "
                        f"{', '.join(sorted(ARCHITECTURES))}; this one is not supported")
    if names[0] == "MistralForCausalLM" and config.get("sliding_window"):
        raise UserError(f"{where}/config.json: sliding_window {config['sliding_window']}: llama.cpp's llama "
                        "architecture has no sliding-window attention; GGUF export takes Mistral models without one")
    return found


def pre_tokenizer(tokenizer_json: dict, where: str) -> str:
    """llama.cpp's pre-tokenizer name for the one in tokenizer.json: the split it makes must be the
    one the model was trained with."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{where}/tokenizer.json: a {model.get('type', '?')} tokenizer"
                        f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}: GGUF "
                        "export writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2, GPT-2 style)")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"  # Llama 3: numbers in runs of up to three digits
        if r"|\p{N}|" in pattern:
            return "qwen2"  # Qwen2: every digit on its own
    raise UserError(f"{where}/tokenizer.json: pre_tokenizer {json.dumps(pre)[:200]}: GGUF export does not know "
                    "llama.cpp's name for this pre-tokenizer (known: GPT-2 byte-level, SmolLM, Llama 3, Qwen2)")


def permute_qk(weight: Any, heads: int) -> Any:
    """transformers' rotate-half layout -> llama.cpp's interleaved one, per head, for the rows of a
    q or k projection (weight or bias)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_type(name: str, shape: tuple[int, ...], outtype: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or outtype == "f32":
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[outtype]
    if outtype.startswith("q4") and name in ("token_embd.weight", "output.weight"):
        wanted = Q.Q8_0
    if wanted in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and shape[-1] % 32:
        return Q.F16
    return wanted


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[outtype]


def _encode(tensor: Any, qtype: Any) -> Any:
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = tensor.detach().float().cpu().numpy()
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return quants.quantize(data, qtype)


def _vocabulary(tokenizer: Any, tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp token types, merges) for ``vocab_size`` ids; ids the
    tokenizer does not use (a padded embedding) become unused placeholders."""
    from gguf import TokenType

    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", [])}
    vocab = tokenizer.get_vocab()
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    return tokens, types, merges


def _rope(config: Any) -> tuple[float, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise UserError(f"config.json: rope_parameters.rope_type {kind!r}: GGUF export writes default and linear "
                        "(rope_pi_ratio) RoPE")
    return theta, ({"factor": float(params["factor"])} if kind == "linear" else {})


def export_gguf(model_name_or_path: str, output: str, outtype: str = "f16", s3: dict | None = None,
                say: Callable[[str], None] = lambda _: None) -> GgufExport:
    """Write ``model_name_or_path`` (any model ``model.locate`` finds; a LoRA adapter is merged into
    its base) as one GGUF file at ``output`` (local or s3://). The file appears whole or not at all."""
    import shutil
    import tempfile

    import gguf
    from transformers import AutoTokenizer

    from lmflow_ray.model.load import load_for_inference, tokenizer_folder
    from lmflow_ray.model.locate import display_name, exact_uri, local_folder, split_adapter

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype: {outtype!r} is not one of {', '.join(OUTTYPES)}")
    output = output if storage.is_remote(output) else os.path.abspath(output)
    check_target(output, s3)
    if not storage.is_remote(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    uri = exact_uri(model_name_or_path, s3, "--model_name_or_path")
    base_uri, adapter_uri = split_adapter(uri, s3)
    base = local_folder(base_uri, s3)
    adapter = local_folder(adapter_uri, s3) if adapter_uri else None
    if not os.path.isdir(base):
        raise UserError(f"--model_name_or_path: {base!r} is not a model folder here")
    with open(os.path.join(base, "config.json")) as f:
        arch, permuted = architecture(json.load(f), base)
    tok_folder = tokenizer_folder(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(tok_folder)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{tok_folder}: no tokenizer.json (a fast tokenizer); GGUF export reads its vocabulary there")
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = pre_tokenizer(tokenizer_json, tok_folder)

    say(f"loading {uri}" + (f" and merging its adapter into {base_uri}" if adapter else ""))
    model = load_for_inference(base, {"default": adapter} if adapter else None, dtype="float32", merge=bool(adapter))
    config = model.config
    theta, linear = _rope(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)

    tmp_dir = tempfile.mkdtemp(prefix=".lmflow-ray-gguf-", dir=None if storage.is_remote(output) else os.path.dirname(output))
    tmp = os.path.join(tmp_dir, os.path.basename(output))
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(display_name(uri))
        writer.add_type("model")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(theta)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != config.hidden_size // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if linear:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(linear["factor"])
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(_file_type(outtype))
        if outtype not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        tokens, types, merges = _vocabulary(tokenizer, tokenizer_json, config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        probe = tokenizer("a").input_ids
        for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                           ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
            tid = getattr(tokenizer, f"{token}_token_id")
            if tid is not None:
                add(tid)
        writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
        if tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]:
            writer.add_add_eos_token(True)
        if isinstance(tokenizer.chat_template, str):
            writer.add_chat_template(tokenizer.chat_template)

        tied = bool(getattr(config, "tie_word_embeddings", False))
        # A tied head is left out: llama.cpp reads the embedding as the output head when there is none.
        state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        say(f"writing {len(state)} tensors as {outtype} ...")
        for hf_name, tensor in state.items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"{base}: tensor {hf_name!r} has no llama.cpp name for {arch}; not exported")
            if permuted and re.search(r"\.self_attn\.q_proj\.", hf_name):
                tensor = permute_qk(tensor, heads)
            elif permuted and re.search(r"\.self_attn\.k_proj\.", hf_name):
                tensor = permute_qk(tensor, kv_heads)
            qtype = tensor_type(name, tuple(tensor.shape), outtype)
            writer.add_tensor(name, _encode(tensor, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        size = os.path.getsize(tmp)
        if storage.is_remote(output):
            storage.upload_file(tmp, output, s3)
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return GgufExport(output, arch, outtype, counts, size, adapter_uri)
