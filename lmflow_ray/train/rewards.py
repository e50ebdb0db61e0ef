"""Scoring conversations with a reward model, as a Ray Data batch job (model actors, as eval runs).

The model is what a ``train.objective=reward`` run exports (a sequence classifier with one output,
or a LoRA adapter saved with its score head), a folder of one, or any run / checkpoint / s3:// URI
the locator finds. A conversation is rendered with the recipe's template, exactly as training
rendered it, and its reward is the score at its last token, where training read it.
`lmflow-ray eval` uses it for held-out pairwise accuracy; RAFT scores its samples with it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError


def is_reward_model(base_folder: str, adapter_folder: str | None) -> bool:
    """Whether a located model has a score head: a sequence classifier, or an adapter trained as one."""
    if adapter_folder:
        with open(os.path.join(adapter_folder, "adapter_config.json")) as f:
            return json.load(f).get("task_type") == "SEQ_CLS"
    with open(os.path.join(base_folder, "config.json")) as f:
        return any(a.endswith("ForSequenceClassification") for a in json.load(f).get("architectures") or [])


def load_reward_model(base_folder: str, adapter_folder: str | None, dtype: Any, trust_remote_code: bool) -> Any:
    """The reward model in eval mode: a saved classifier, or a base with a trained adapter + head merged in."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base_folder, num_labels=1, dtype=dtype,
                                                               trust_remote_code=trust_remote_code)
    if adapter_folder:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_folder).merge_and_unload()
    return model.eval()


class RewardScorer:
    """A Ray Data actor: one copy of the reward model; rows hold a ``conversation`` (JSON) each
    and get its ``reward``."""

    def __init__(self, base_uri: str, adapter_uri: str | None, s3: dict | None, threads: int, template: str | None,
                 batch_size: int, block_size: int, trust_remote_code: bool):
        import torch

        from lmflow_ray.data.pipeline import Spec, tools_for
        from lmflow_ray.model.load import tokenizer_folder
        from lmflow_ray.model.locate import local_folder
        from lmflow_ray.train.objectives import score_module

        torch.set_num_threads(max(1, threads))
        base = local_folder(base_uri, s3)
        adapter = local_folder(adapter_uri, s3) if adapter_uri else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_reward_model(base, adapter, torch.float32, trust_remote_code).to(self.device)
        spec = Spec(model_name_or_path=tokenizer_folder(base, adapter), trust_remote_code=trust_remote_code,
                    conversation_template=template, kind="conversation", block_size=block_size,
                    train_on_prompt=False, packing=False)
        self.tokenizer, self.template, _ = tools_for(spec)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.model.config.pad_token_id is None:  # transformers refuses batches without one
            self.model.config.pad_token_id = self.pad
        self.batch_size, self.block_size = batch_size, block_size
        self.scores = None

        def keep(_module, _inputs, output):
            self.scores = output

        score_module(self.model).register_forward_hook(keep)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = [self.reward([json.loads(c) for c in batch["conversation"][i:i + self.batch_size]])
               for i in range(0, len(batch["conversation"]), self.batch_size)]
        return {"index": batch["index"], "reward": [r for part in out for r in part]}

    def reward(self, conversations: list[dict]) -> list[float]:
        """Each conversation's score at its last token (right-padded; padding comes after it)."""
        import torch

        from lmflow_ray.data.formats import check_instance
        from lmflow_ray.data.tokenize import tokenize_rendered

        rendered = [self.template.render(check_instance("conversation", c)) for c in conversations]
        ids = [t.ids[:self.block_size] for t in tokenize_rendered(rendered, self.tokenizer)]
        width = max(len(i) for i in ids)
        tensor = torch.full((len(ids), width), self.pad, dtype=torch.long)
        for row, seq in enumerate(ids):
            tensor[row, :len(seq)] = torch.as_tensor(seq)
        with torch.no_grad():
            self.model(input_ids=tensor.to(self.device), attention_mask=None, use_cache=False)
        scores = self.scores[..., 0].float().cpu()
        return [float(scores[row, len(seq) - 1]) for row, seq in enumerate(ids)]


def score_conversations(recipe: Recipe, conversations: list[dict], say: Callable[[str], None] = print) -> list[float]:
    """Rewards for ``conversations`` from the recipe's model (a reward model): a Ray Data job with
    as many model copies as eval would use. Ray must be initialised."""
    import ray

    from lmflow_ray import storage
    from lmflow_ray.ray_init import model_copies

    s3 = storage.S3Options.resolve(recipe.storage).to_dict()
    base_uri, adapter_uri = reward_model_uris(recipe, s3)
    workers, cpus, gpus = model_copies(recipe.eval.eval_num_workers)
    workers = max(1, min(workers, math.ceil(len(conversations) / recipe.eval.inference_batch_size_per_device)))
    batch = recipe.eval.inference_batch_size_per_device
    rows = [{"index": i, "conversation": json.dumps(c)} for i, c in enumerate(conversations)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch)))
    ds = ds.map_batches(RewardScorer, fn_constructor_kwargs=dict(
        base_uri=base_uri, adapter_uri=adapter_uri, s3=s3, threads=int(cpus), template=recipe.data.conversation_template,
        batch_size=batch, block_size=recipe.data.block_size, trust_remote_code=recipe.model.trust_remote_code),
        batch_size=batch, concurrency=workers, batch_format="numpy", max_restarts=0, num_cpus=cpus, num_gpus=gpus)
    found: dict[int, float] = {}
    shown = -1
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        found.update(zip((int(i) for i in part["index"]), (float(r) for r in part["reward"])))
        step = int(10 * len(found) / max(1, len(rows)))
        if step != shown:
            shown = step
            say(f"reward: {len(found)}/{len(rows)} scored")
    return [found[i] for i in range(len(rows))]


def reward_model_uris(recipe: Recipe, s3: dict) -> tuple[str, str | None]:
    """(base, adapter or None) of the recipe's model, refused unless it has a score head."""
    from lmflow_ray.model.locate import exact_uri, local_folder, split_adapter

    uri = exact_uri(recipe.model.model_name_or_path, s3, "model.model_name_or_path")
    base_uri, adapter_uri = split_adapter(uri, s3)
    base = local_folder(base_uri, s3)
    adapter = local_folder(adapter_uri, s3) if adapter_uri else None
    if not is_reward_model(base, adapter):
        raise UserError(f"model.model_name_or_path: {recipe.model.model_name_or_path!r} is not a reward model (no score "
                        "head); train one with train.objective=reward, or point at its run or export")
    return base_uri, adapter_uri
