"""Training goals behind one face: each objective owns its collation, its loss, its metrics and the
model head it needs, so the worker loop (``train/worker.py``) never branches on what it trains for.

- ``sft``: next-token loss on the trained (reply) tokens of packed rows, HF's ``.loss``.
- ``reward``: a one-output score head (``AutoModelForSequenceClassification``, ``num_labels=1``)
  trained on chosen / rejected pairs with ``-logsigmoid(r_chosen - r_rejected - margin)``.
- ``dpo``: the DPO family on the same pairs: ``sigmoid`` (DPO, with ``label_smoothing`` = cDPO),
  ``hinge``, ``ipo`` (length-averaged), and the reference-free ``simpo``.

Preference rows are packed like SFT rows: whole pairs, the chosen side then the rejected side, each
a segment of its own (positions restart, so no side attends to another), and every side's
log-probability is the sum over its trained tokens. The loss functions are pure (tensors in,
tensors out) and tested against hand-computed values.

An objective reports sums (``tally``): the loop adds them up over micro-batches and ranks, and the
objective turns the totals into metrics with TRL's names (``rewards/chosen``, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmflow_ray.data.packing import collate_columns
from lmflow_ray.data.tokenize import IGNORE_INDEX

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)


# ---- pure losses ---------------------------------------------------------------------------------


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per pair: -logsigmoid(r_chosen - r_rejected - margin) (Bradley-Terry; margin optional)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
             ref_rejected: torch.Tensor | None, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
             margin: torch.Tensor | None = None, rpo_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair: (loss, chosen reward, rejected reward) from summed log-probs of each side.

    With Δ = (logπ_c - logπ_ref_c) - (logπ_r - logπ_ref_r) and m = margin (0 without one):
    sigmoid -(1-ε)·logsigmoid(βΔ - m) - ε·logsigmoid(-(βΔ - m)); hinge relu(1 - (βΔ - m));
    ipo (Δ̄ - 1/(2β))² with Δ̄ from per-token averaged log-probs (TRL); simpo (no reference)
    -logsigmoid(β(logπ_c/|c| - logπ_r/|r|) - γ - m), with label smoothing as sigmoid's.
    Rewards are β times the log-ratio (simpo: β times the averaged log-prob), as TRL logs them.
    ``rpo_alpha`` α adds α times the chosen side's per-token NLL, -logπ_c/|c| (TRL's RPO)."""
    nll = -policy_chosen / chosen_tokens.clamp(min=1)
    m = margin if margin is not None else torch.zeros_like(policy_chosen)
    if loss_type == "simpo":
        chosen_r = beta * policy_chosen / chosen_tokens.clamp(min=1)
        rejected_r = beta * policy_rejected / rejected_tokens.clamp(min=1)
        logits = chosen_r - rejected_r - simpo_gamma - m
        loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        return loss + rpo_alpha * nll, chosen_r.detach(), rejected_r.detach()
    assert ref_chosen is not None and ref_rejected is not None, f"loss_type {loss_type} needs reference log-probs"
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (delta - m - 1 / (2 * beta)) ** 2
    else:
        logits = beta * (chosen_ratio - rejected_ratio) - m
        if loss_type == "hinge":
            loss = torch.relu(1 - logits)
        elif loss_type == "sigmoid":
            loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        else:
            raise ValueError(f"loss_type {loss_type!r}: one of {', '.join(DPO_LOSSES)}")
    return loss + rpo_alpha * nll, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def segment_logps(logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor,
                  count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each segment's trained tokens, trained tokens per segment).

    ``segments[b, t]`` numbers the segment token t belongs to (0 .. count-1, -1 for padding); the
    token at t is predicted from the logits at t - 1, as HF's loss shifts them."""
    logits, labels, segments = logits[:, :-1].float(), labels[:, 1:], segments[:, 1:]
    trained = labels != IGNORE_INDEX
    picked = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * trained
    where = segments.clamp(min=0).reshape(-1)
    sums = torch.zeros(count, dtype=token_logps.dtype, device=logits.device).index_add(0, where, token_logps.reshape(-1))
    tokens = torch.zeros(count, dtype=token_logps.dtype, device=logits.device).index_add(
        0, where, trained.reshape(-1).to(token_logps.dtype))
    return sums, tokens


# ---- collation of preference rows ------------------------------------------------------------------


def collate_pairs(batch: dict, pad_token_id: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Packed pair rows (segments chosen, rejected, chosen, rejected, ...) -> the padded arrays
    ``collate`` gives, plus ``segments`` (each token's segment number in the micro-batch, -1 on
    padding), ``ends`` (each segment's last token as a flat index into the padded batch) and, when
    the rows carry them, ``ref_logps`` / ``margins`` per segment / pair."""
    arrays = collate_columns(batch, pad_token_id, pad_to)
    rows, width = arrays["input_ids"].shape
    segments = np.full((rows, width), -1, dtype=np.int64)
    ends, at = [], 0
    for i, lengths in enumerate(batch["lengths"]):
        start = 0
        for length in lengths:
            segments[i, start:start + length] = at
            ends.append(i * width + start + length - 1)
            start += length
            at += 1
    arrays.update(segments=segments, ends=np.asarray(ends, dtype=np.int64))
    if "ref_logps" in batch:
        arrays["ref_logps"] = np.concatenate([np.asarray(r, dtype=np.float64) for r in batch["ref_logps"]])
    if "margins" in batch:
        arrays["margins"] = np.concatenate([np.asarray(m, dtype=np.float64) for m in batch["margins"]]).astype(np.float32)
    return arrays


# ---- the objectives --------------------------------------------------------------------------------


class Objective:
    """The face the worker loop sees. ``head`` is the model the loader builds (``causal_lm`` or
    ``score``); ``tally`` keys are sums over micro-batches and ranks; ``count`` names the one
    that averages the loss (trained tokens for SFT, pairs for preferences)."""

    name = "sft"
    head = "causal_lm"
    paired = False
    count = "trained"
    tally_keys: tuple[str, ...] = ("loss_sum", "trained")

    def attach(self, module: Any) -> None:
        """The unwrapped model, once the strategy has it (hooks, adapter switches)."""
        self.module = module

    def collate(self, batch: dict, pad_token_id: int, pad_to: int | None) -> dict[str, np.ndarray]:
        return collate_columns(batch, pad_token_id, pad_to)

    def loss(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return {"loss": totals["loss_sum"] / max(1.0, totals[self.count])}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        return {f"eval_{k}": v for k, v in self.metrics(totals).items()}


class SFT(Objective):
    """Supervised fine-tuning: the mean next-token loss over every trained token of the step."""

    def loss(self, model, inputs):
        trained = int((inputs["labels"] != IGNORE_INDEX).sum())
        # Mean over trained tokens; a micro-batch whose answers were all cut off gives 0, not NaN.
        loss = model(**inputs, attention_mask=None, use_cache=False,
                     num_items_in_batch=torch.tensor(max(1, trained), device=inputs["labels"].device)).loss
        return loss, {"loss_sum": float(loss.detach()) * trained, "trained": trained}

    def eval_metrics(self, totals):
        import math

        mean = totals["loss_sum"] / max(1.0, totals["trained"])
        return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(totals["trained"])}


PAIR_KEYS = ("loss_sum", "pairs", "trained", "chosen_reward", "rejected_reward", "correct", "chosen_logps",
             "rejected_logps")


class _Pairs(Objective):
    paired = True
    count = "pairs"
    tally_keys = PAIR_KEYS

    def collate(self, batch, pad_token_id, pad_to):
        return collate_pairs(batch, pad_token_id, pad_to)

    @staticmethod
    def _tally(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, trained: int,
               chosen_logps: torch.Tensor | None = None, rejected_logps: torch.Tensor | None = None) -> dict[str, float]:
        out = {"loss_sum": float(loss.detach().sum()), "pairs": len(chosen), "trained": trained,
               "chosen_reward": float(chosen.sum()), "rejected_reward": float(rejected.sum()),
               "correct": float((chosen > rejected).sum()), "chosen_logps": 0.0, "rejected_logps": 0.0}
        if chosen_logps is not None:
            out.update(chosen_logps=float(chosen_logps.detach().sum()), rejected_logps=float(rejected_logps.detach().sum()))
        return out

    def metrics(self, totals):
        pairs = max(1.0, totals["pairs"])
        chosen, rejected = totals["chosen_reward"] / pairs, totals["rejected_reward"] / pairs
        return {"loss": totals["loss_sum"] / pairs, "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/accuracies": totals["correct"] / pairs, "rewards/margins": chosen - rejected}


class Reward(_Pairs):
    """Reward modelling (LMFlow's rm_tuner): a scalar score at each side's last token."""

    name = "reward"
    head = "score"

    def attach(self, module):
        super().attach(module)
        self.scores = None
        head = score_module(module)

        def keep(_module, _inputs, output):
            self.scores = output

        head.register_forward_hook(keep)

    def loss(self, model, inputs):
        trained = int((inputs["labels"] != IGNORE_INDEX).sum())
        model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], attention_mask=None, use_cache=False)
        scores = self.scores.reshape(-1)[inputs["ends"]].float()  # (b, s, 1): every position's score
        self.scores = None
        chosen, rejected = scores[0::2], scores[1::2]
        losses = reward_loss(chosen, rejected, inputs.get("margins"))
        return losses.mean(), self._tally(losses, chosen.detach(), rejected.detach(), trained)

    def metrics(self, totals):
        out = super().metrics(totals)
        return {"loss": out["loss"], "accuracy": out["rewards/accuracies"], "margin": out["rewards/margins"],
                "reward_chosen": out["rewards/chosen"], "reward_rejected": out["rewards/rejected"]}


class DPO(_Pairs):
    """The DPO family. The reference's log-probs come with the rows (precomputed once before
    training, by a Ray Data pass) or, for LoRA, from the same model with its adapter disabled."""

    name = "dpo"

    def __init__(self, beta: float, loss_type: str, label_smoothing: float, simpo_gamma: float,
                 margin_scale: float, live_reference: bool, rpo_alpha: float = 0.0):
        self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha = beta, loss_type, label_smoothing, rpo_alpha
        self.simpo_gamma, self.margin_scale, self.live_reference = simpo_gamma, margin_scale, live_reference

    def loss(self, model, inputs):
        count = len(inputs["ends"])
        trained = int((inputs["labels"] != IGNORE_INDEX).sum())
        call = dict(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], attention_mask=None,
                    use_cache=False)
        logps, tokens = segment_logps(model(**call).logits, inputs["labels"], inputs["segments"], count)
        ref = None
        if self.loss_type not in REFERENCE_FREE:
            if "ref_logps" in inputs:
                ref = inputs["ref_logps"].to(logps.dtype)
            else:
                assert self.live_reference, "dpo: rows without ref_logps and no live reference"
                with torch.no_grad(), self.module.disable_adapter():
                    ref, _ = segment_logps(model(**call).logits, inputs["labels"], inputs["segments"], count)
        margin = inputs["margins"] * self.margin_scale if "margins" in inputs else None
        losses, chosen, rejected = dpo_loss(
            logps[0::2], logps[1::2], None if ref is None else ref[0::2], None if ref is None else ref[1::2],
            tokens[0::2], tokens[1::2], beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma, margin=margin, rpo_alpha=self.rpo_alpha)
        return losses.mean(), self._tally(losses, chosen, rejected, trained, logps[0::2], logps[1::2])

    def metrics(self, totals):
        pairs = max(1.0, totals["pairs"])
        return {**super().metrics(totals), "logps/chosen": totals["chosen_logps"] / pairs,
                "logps/rejected": totals["rejected_logps"] / pairs}


def score_module(module: Any) -> Any:
    """The score head of a sequence-classification model (the outermost module called ``score``,
    which under LoRA is peft's trainable copy of it)."""
    found = [(name, m) for name, m in module.named_modules() if name.split(".")[-1] == "score"]
    if not found:
        raise ValueError(f"{type(module).__name__} has no `score` head")
    return min(found, key=lambda item: len(item[0]))[1]


def make_objective(train: Any, use_lora: bool) -> Objective:
    """The recipe's ``train.objective`` with its options (ordinary train keys, LMFlow's names)."""
    if train.objective == "reward":
        return Reward()
    if train.objective == "dpo":
        return DPO(train.beta, train.loss_type, train.label_smoothing, train.simpo_gamma, train.margin_scale,
                   live_reference=reference_is_live(train, use_lora), rpo_alpha=train.rpo_alpha)
    return SFT()


def reference_is_live(train: Any, use_lora: bool) -> bool:
    """DPO's reference, per recipe: the base with the adapter disabled (LoRA, unless
    precompute_ref_log_probs) or log-probs precomputed once before training (always for full
    fine-tuning, and for a reference_model_name_or_path: a second model is never resident in the
    training workers)."""
    if train.objective != "dpo" or train.loss_type in REFERENCE_FREE:
        return False
    if getattr(train, "reference_model_name_or_path", None):  # another model than the start: scored once
        return False
    if train.precompute_ref_log_probs is None:
        return use_lora
    return use_lora and not train.precompute_ref_log_probs


def needs_reference_pass(train: Any, use_lora: bool) -> bool:
    return train.objective == "dpo" and train.loss_type not in REFERENCE_FREE and not reference_is_live(train, use_lora)
