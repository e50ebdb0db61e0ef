"""The objectives' pure parts: each loss against a hand-computed value, per-segment log-probs against
a plain loop, pair rows and their collation; and, on a tiny real model without Ray, the reward
head export and the reference pass against a live reference forward."""

import math

import numpy as np
import pytest
import torch

from lmflow_ray.data.packing import last_reply, pack_pairs, prepare_side
from lmflow_ray.data.tokenize import IGNORE_INDEX, Encoded
from lmflow_ray.train.objectives import (DPO, Reward, collate_pairs, dpo_loss, make_objective, needs_reference_pass,
                                         reference_is_live, reward_loss, segment_logps)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def softplus(x):
    return math.log1p(math.exp(x))  # -logsigmoid(-x)


def test_reward_loss_is_bradley_terry_with_an_optional_margin():
    assert reward_loss(t(2.0), t(1.0)).item() == pytest.approx(softplus(-1.0))  # -log σ(1) = 0.31326
    assert reward_loss(t(2.0), t(1.0)).item() == pytest.approx(0.3132617)
    assert reward_loss(t(2.0), t(1.0), t(0.5)).item() == pytest.approx(softplus(-0.5))
    assert reward_loss(t(0.0), t(3.0)).item() == pytest.approx(3.0485874)  # a wrong order costs more


# policy chosen -10, rejected -12; reference -11 both: Δ = (+1) - (-1) = 2
POLICY, REF, TOKENS = (t(-10.0), t(-12.0)), (t(-11.0), t(-11.0)), (t(2.0), t(4.0))


def dpo(loss_type, **kw):
    kw.setdefault("beta", 0.1)
    loss, chosen, rejected = dpo_loss(*POLICY, *REF, *TOKENS, loss_type=loss_type, **kw)
    return loss.item(), chosen.item(), rejected.item()


def test_dpo_sigmoid_hinge_and_cdpo_by_hand():
    loss, chosen, rejected = dpo("sigmoid")
    assert loss == pytest.approx(0.5981389)  # -log σ(0.1 · 2) = log(1 + e^-0.2)
    assert (chosen, rejected) == (pytest.approx(0.1), pytest.approx(-0.1))  # β · log-ratio, TRL's rewards
    assert dpo("sigmoid", label_smoothing=0.1)[0] == pytest.approx(0.9 * 0.5981389 + 0.1 * 0.7981389)
    assert dpo("hinge")[0] == pytest.approx(0.8)  # relu(1 - 0.2)
    assert dpo("hinge", beta=1.0)[0] == 0.0  # βΔ = 2 is past the hinge
    assert dpo("sigmoid", margin=t(0.2))[0] == pytest.approx(math.log(2))  # βΔ - m = 0
    # RPO: plus α times the chosen side's per-token NLL, 10 / 2 = 5 nats.
    assert dpo("sigmoid", rpo_alpha=0.5)[0] == pytest.approx(0.5981389 + 0.5 * 5.0)
    assert dpo("hinge", rpo_alpha=1.0)[0] == pytest.approx(0.8 + 5.0)


def test_ipo_uses_per_token_averages_and_simpo_needs_no_reference():
    # IPO: Δ̄ = 1/2 - (-1)/4 = 0.75; (0.75 - 1/(2·0.1))² = (0.75 - 5)² = 18.0625
    assert dpo("ipo")[0] == pytest.approx(18.0625)
    # SimPO, β 2, γ 0.5: 2·(-10/2) - 2·(-12/4) = -4; loss = -log σ(-4 - 0.5) = log(1 + e^4.5)
    loss, chosen, rejected = dpo_loss(*POLICY, None, None, *TOKENS, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    assert loss.item() == pytest.approx(4.5 + math.log1p(math.exp(-4.5)))  # 4.511048
    assert (chosen.item(), rejected.item()) == (-10.0, -6.0)


def test_segment_logps_sum_each_segments_trained_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 4, -100, 7, 8], [-100, 1, -100, 2, -100, -100]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, -1, -1]])
    sums, tokens = segment_logps(logits, labels, segments, 4)
    logp = torch.log_softmax(logits, -1)
    want = [0.0] * 4
    for b in range(2):
        for i in range(1, 6):
            if labels[b, i] != -100:
                want[segments[b, i]] += logp[b, i - 1, labels[b, i]].item()
    assert sums.tolist() == pytest.approx(want)
    assert tokens.tolist() == [2, 2, 1, 1]


def test_prepare_side_masks_all_but_the_reply_and_keeps_the_prompts_end():
    side = Encoded([1, 2, 3, 4, 5, 6, 7, 8], [-100, -100, 3, 4, -100, -100, 7, 8])
    assert last_reply(side.labels) == 6
    masked = prepare_side(side, 100, mask_prompt=True, max_prompt_length=None)
    assert masked.labels == [-100] * 6 + [7, 8] and masked.input_ids == side.input_ids
    assert prepare_side(side, 100, mask_prompt=False, max_prompt_length=None).labels == side.labels
    cut = prepare_side(side, 100, mask_prompt=True, max_prompt_length=2)
    assert cut.input_ids == [5, 6, 7, 8] and cut.labels == [-100, -100, 7, 8] and not cut.truncated
    short = prepare_side(side, 5, mask_prompt=True, max_prompt_length=None)  # the prompt's start goes first
    assert short.input_ids == [4, 5, 6, 7, 8] and short.labels == [-100, -100, -100, 7, 8] and short.truncated
    tiny = prepare_side(side, 1, mask_prompt=True, max_prompt_length=None)  # then the reply's end
    assert tiny.input_ids == [7] and tiny.labels == [7] and tiny.truncated


def test_pairs_pack_whole_and_collate_to_segments():
    def enc(n, first):
        return Encoded(list(range(first, first + n)), [IGNORE_INDEX] + list(range(first + 1, first + n)))

    pairs = [(enc(3, 10), enc(2, 20), 0.5), (enc(4, 30), enc(4, 40), 0.0), (enc(1, 50), enc(1, 60), 1.0)]
    rows = pack_pairs(pairs, 10)
    assert [len(r.input_ids) for r in rows] == [10, 5]  # best fit: (4+4) and (1+1), then (3+2)
    for r in rows:
        assert len(r.lengths) == 2 * len(r.margins)
    assert len(pack_pairs(pairs, None)) == 3
    batch = {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows],
             "lengths": [r.lengths for r in rows], "margins": [r.margins for r in rows]}
    arrays = collate_pairs(batch, pad_token_id=0)
    width = arrays["input_ids"].shape[1]
    assert width == 10 and len(arrays["ends"]) == 6
    flat_ids, flat_seg = arrays["input_ids"].reshape(-1), arrays["segments"].reshape(-1)
    assert [int(flat_seg[e]) for e in arrays["ends"]] == list(range(6))
    assert flat_ids[arrays["ends"][0]] == 33 and (arrays["segments"][1, 9] == -1)  # row 2 is padded at its end
    assert arrays["margins"].tolist() == [0.0, 1.0, 0.5]


def test_which_reference_each_recipe_gets():
    from lmflow_ray.config import TrainSection

    dpo_ = TrainSection(objective="dpo")
    assert reference_is_live(dpo_, use_lora=True) and not needs_reference_pass(dpo_, use_lora=True)
    assert not reference_is_live(dpo_, use_lora=False) and needs_reference_pass(dpo_, use_lora=False)
    pre = TrainSection(objective="dpo", precompute_ref_log_probs=True)
    assert needs_reference_pass(pre, use_lora=True)
    simpo = TrainSection(objective="dpo", loss_type="simpo")
    assert not needs_reference_pass(simpo, use_lora=False) and not reference_is_live(simpo, use_lora=True)
    assert isinstance(make_objective(TrainSection(objective="reward"), False), Reward)
    assert isinstance(make_objective(dpo_, True), DPO) and make_objective(TrainSection(), False).name == "sft"


# ---- on a tiny real model (no Ray) -------------------------------------------------------------


def pair_batch(tok, n=3):
    """Packed pair rows from real ChatML conversations, as the pipeline makes them."""
    from lmflow_ray.data.pipeline import Spec, process

    spec = Spec(model_name_or_path=str(tok), trust_remote_code=False, conversation_template="chatml",
                kind="paired_conversation", block_size=64, train_on_prompt=False, packing=True)
    instances = [{"chosen": {"messages": [{"role": "user", "content": f"Order {i}?"},
                                          {"role": "assistant", "content": f"ORD-{i}2345"}]},
                  "rejected": {"messages": [{"role": "user", "content": f"Order {i}?"},
                                            {"role": "assistant", "content": "Hello, how are you?"}]}}
                 for i in range(n)]
    return process(instances, spec)


def test_reward_head_exports_and_scores_like_transformers(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from lmflow_ray.config import ModelSection
    from lmflow_ray.model.load import load_model

    torch.manual_seed(0)
    model = load_model(ModelSection(model_name_or_path=str(tiny_model_dir)), head="score", pad_token_id=0).eval()
    model.save_pretrained(tmp_path / "rm")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert again.config.num_labels == 1 and type(again).__name__ == "LlamaForSequenceClassification"

    rows = pair_batch(tiny_model_dir)
    objective = Reward()
    objective.attach(again)
    arrays = {k: torch.from_numpy(v) for k, v in collate_pairs(rows, pad_token_id=0).items()}
    with torch.no_grad():
        loss, tally = objective.loss(again, arrays)
        # Each side scored alone by transformers' own pooling (its last token) gives the same number.
        alone = []
        for ids, lengths in zip(rows["input_ids"], rows["lengths"]):
            start = 0
            for n in lengths:
                alone.append(again(input_ids=torch.tensor([ids[start:start + n]])).logits.item())
                start += n
    chosen, rejected = torch.tensor(alone[0::2]), torch.tensor(alone[1::2])
    assert tally["pairs"] == 3
    assert tally["chosen_reward"] == pytest.approx(float(chosen.sum()), abs=1e-4)
    assert tally["rejected_reward"] == pytest.approx(float(rejected.sum()), abs=1e-4)
    assert loss.item() == pytest.approx(float(reward_loss(chosen, rejected).mean()), abs=1e-4)


def test_reference_pass_equals_a_live_reference_forward(tiny_model_dir):
    from lmflow_ray.config import Recipe
    from lmflow_ray.model.adapters import apply_lora
    from lmflow_ray.model.load import load_model
    from lmflow_ray.train.reference import ReferenceScorer, add_reference, row_key

    recipe = Recipe(model={"model_name_or_path": str(tiny_model_dir)})
    rows = pair_batch(tiny_model_dir, n=5)
    scorer = ReferenceScorer(recipe.model_dump(), str(tiny_model_dir), {}, batch_size=2, threads=1)
    scored = scorer({k: rows[k] for k in ("input_ids", "labels", "lengths")})
    table = dict(zip(scored["key"], scored["ref_logps"]))
    with_ref = add_reference(dict(rows), table)

    # Live: the same base under a LoRA adapter, the adapter disabled (the LoRA reference).
    model = apply_lora(load_model(recipe.model), recipe.model.model_copy(update={"use_lora": True}))
    with torch.no_grad():  # a trained adapter: its B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    live, precomputed = DPO(0.1, "sigmoid", 0.0, 0.5, 1.0, live_reference=True), DPO(0.1, "sigmoid", 0.0, 0.5, 1.0, False)
    live.attach(model)
    precomputed.attach(model)
    model.eval()
    arrays = {k: torch.from_numpy(v) for k, v in collate_pairs(rows, pad_token_id=0).items()}
    with_arrays = {k: torch.from_numpy(v) for k, v in collate_pairs(with_ref, pad_token_id=0).items()}
    assert "ref_logps" in with_arrays and "ref_logps" not in arrays
    with torch.no_grad():
        a, ta = live.loss(model, arrays)
        b, tb = precomputed.loss(model, with_arrays)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    assert ta["chosen_reward"] == pytest.approx(tb["chosen_reward"], abs=1e-6)
    assert ta["chosen_reward"] != pytest.approx(0.0, abs=1e-4)  # the policy differs from its reference
    assert row_key(rows["input_ids"][0], rows["lengths"][0]) in table
    assert np.isfinite(np.concatenate(scored["ref_logps"])).all()
