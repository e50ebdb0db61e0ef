"""`lmflow-ray draft`: a draft model for speculative decoding, made from the target it will serve
beside: the target's first ``draft_layers`` decoder blocks with its embeddings, final norm and head,
then fine-tuned on the target's own greedy replies to the training prompts (generated with the
rollout actors, trained with the train path). It shares the target's tokenizer by construction.

The work folder (output_model_path/run_name) holds ``replies/`` (what the target said), ``init/``
(the cut copy), ``model/`` (the training run, the draft to serve) and ``draft.json`` (written
last); each stage is skipped when its output is there, so a stopped job resumes with the same run_name.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from lmflow_ray import storage
from lmflow_ray.align import rollout
from lmflow_ray.align.loop import _done, iteration_prompts, read_json, train_filling_workers, write_dataset
from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.lease import LEASE, Lease


@dataclass
class DraftResult:
    work_uri: str
    draft_uri: str  # the trained run: serve it as serve.draft_model
    layers: int
    target_layers: int
    replies: int
    seconds: dict[str, float]


def greedy_recipe(recipe: Recipe) -> Recipe:
    """The rollout settings for the target's replies: one greedy reply per prompt."""
    d = recipe.draft
    return recipe.model_copy(update={"align": recipe.align.model_copy(update={
        "num_output_sequences": 1, "temperature": 0.0, "top_p": 1.0, "output_min_length": 1,
        "output_max_length": d.draft_max_new_tokens or recipe.serve.max_new_tokens,
        "prompts_per_iteration": d.draft_prompts})})


def target_blocks(target: str, s3: dict | None, trust_remote_code: bool) -> int:
    from transformers import AutoConfig

    from lmflow_ray.model.locate import local_folder, split_adapter

    base = local_folder(split_adapter(target, s3)[0], s3)
    return int(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code).num_hidden_layers)


def cut_target(target: str, layers: int, init_uri: str, s3: dict | None, trust_remote_code: bool) -> int:
    """Write the target's first ``layers`` blocks (a LoRA run merged first) to ``init_uri``;
    returns the target's block count."""
    from transformers import AutoTokenizer

    from lmflow_ray.model.draft import truncate
    from lmflow_ray.model.load import load_for_inference, tokenizer_folder
    from lmflow_ray.model.locate import local_folder, split_adapter

    base_uri, adapter_uri = split_adapter(target, s3)
    base = local_folder(base_uri, s3)
    adapter = local_folder(adapter_uri, s3) if adapter_uri else None
    model = load_for_inference(base, {"target": adapter} if adapter else None, dtype="float32",
                               trust_remote_code=trust_remote_code, merge=bool(adapter))
    total = model.config.num_hidden_layers
    truncate(model, layers, "draft.draft_layers")
    with tempfile.TemporaryDirectory(prefix="lmflow-ray-draft-") as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_folder(base, adapter), trust_remote_code=trust_remote_code).save_pretrained(tmp)
        storage.upload(tmp, init_uri, s3)
    return total


def run_draft(recipe: Recipe, fresh: bool = False, say: Callable[[str], None] = print) -> DraftResult:
    """The whole job; Ray must be initialised."""
    from lmflow_ray.model.locate import exact_uri
    from lmflow_ray.train.trainer import run as train_run
    from lmflow_ray.train.trainer import run_folder, unique_run_name

    if not recipe.data.dataset_path:
        raise UserError("data.dataset_path: required (the prompts the target answers for the draft to learn from)")
    s3 = storage.S3Options.resolve(recipe.storage)
    s3d = s3.to_dict()
    target = exact_uri(recipe.model.model_name_or_path, s3d, "model.model_name_or_path")
    layers = recipe.draft.draft_layers
    name = recipe.storage.run_name or unique_run_name("draft")
    work = run_folder(recipe, name)
    seconds: dict[str, float] = {}
    say(f"draft: the first {layers} blocks of {recipe.model.model_name_or_path}, tuned on its replies, into {work}; "
        f"to resume: run_name={name}")
    with Lease(work, s3).acquire(say):
        if fresh:
            removed = storage.clear_run(work, s3, keep=(LEASE,))
            if removed:
                say(f"--fresh: removed {len(removed)} earlier files of {work}")
        t = time.time()
        greedy = greedy_recipe(recipe)
        kind, prompts = iteration_prompts(greedy, 1, recipe.data.dataset_path, target, say)
        replies_uri = storage.join(work, "replies")
        if _done(replies_uri, s3):
            say(f"draft: the target's replies: already in {replies_uri}")
        else:
            say(f"draft: the target answers {len(prompts)} prompts (greedy, at most "
                f"{greedy.align.output_max_length} tokens)")
            rows = rollout.generate(greedy, target, prompts, recipe.train.seed, say)
            by_index = {p.index: p for p in prompts}
            data = [rollout.with_reply(kind, by_index[r["index"]].instance, r["response"]) for r in rows]
            write_dataset(replies_uri, "replies.json", kind, data, s3)
        seconds["replies"] = round(time.time() - t, 1)

        t = time.time()
        init_uri = storage.join(work, "init")
        if _done(init_uri, s3):
            say(f"draft: the cut copy: already in {init_uri}")
            total = target_blocks(target, s3d, recipe.model.trust_remote_code)
        else:
            total = cut_target(target, layers, init_uri, s3d, recipe.model.trust_remote_code)
            say(f"draft: kept {layers} of the target's {total} decoder blocks ({init_uri})")
        seconds["cut"] = round(time.time() - t, 1)

        t = time.time()
        marker = storage.join(work, "draft.json")
        done = read_json(marker, s3)
        if done:
            say(f"draft: already trained ({done['draft']})")
            return DraftResult(work, done["draft"], layers, total, len(prompts), seconds)
        stage = recipe.model_copy(update={
            "model": recipe.model.model_copy(update={"model_name_or_path": init_uri, "use_lora": False,
                                                     "use_qlora": False}),
            "data": recipe.data.model_copy(update={"dataset_path": storage.join(replies_uri, "replies.json"),
                                                   "eval_dataset_path": None, "validation_split_percentage": 0}),
            "train": recipe.train.model_copy(update={"objective": "sft", "eval_steps": None}),
            "storage": recipe.storage.model_copy(update={"output_model_path": work, "run_name": "model"}),
        })
        say("draft: training the cut copy on the target's replies")
        ran = train_filling_workers(stage, train_run, say)
        seconds["train"] = round(time.time() - t, 1)
        storage.write_bytes(marker, json.dumps({"draft": ran.run_uri, "layers": layers, "target_layers": total,
                                                "replies": len(prompts), "seconds": seconds}, indent=2).encode(), s3)
        result = DraftResult(work, ran.run_uri, layers, total, len(prompts), seconds)
        say(f"draft: done; serve it beside its target with serve.draft_model={ran.run_uri}")
        return result
