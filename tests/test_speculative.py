"""Speculative decoding in the transformers engine: the proposal and acceptance rules alone, then
the engine inside a running batch with requests joining (base and LoRA rows side by side), against
plain transformers generate, for prompt lookup and for a draft model cut from the target."""

import asyncio

import pytest

from test_serve import _adapter, _reference


# ---- the rules alone ---------------------------------------------------------------------------

@pytest.mark.parametrize("seq, k, expected", [
    ([5, 6, 7, 8, 9, 5, 6], 3, [7, 8, 9]),        # the longest n-gram (5 6) is found, its 3 followers
    ([1, 2, 3, 1, 2, 4, 2], 2, [3, 1]),            # no 2-gram (4 2) match: the 1-gram 2's earliest follower
    ([1, 2, 3, 4], 3, []),                          # 4 never came before
    ([7, 8, 7, 8, 7], 5, [8, 7]),                  # the 3-gram (7 8 7) at 0: its followers up to the end
    ([3, 3], 0, []),
])
def test_prompt_lookup_proposes_what_followed_the_last_ngram(seq, k, expected):
    from lmflow_ray.serve.speculative import ngram_proposal

    assert ngram_proposal(seq, k, max_n=3) == expected


def test_prompt_lookup_falls_back_to_recent_replies():
    from lmflow_ray.serve.speculative import ngram_proposal

    recent = [[40, 41, 42], [9, 50, 51, 52]]  # newest first
    assert ngram_proposal([1, 2, 9], 3, max_n=2, recent=recent) == [50, 51]  # a 1-gram match: 2 tokens at most
    assert ngram_proposal([9, 7, 1, 9], 2, max_n=2, recent=recent) == [7, 1]  # the request's own match first
    assert ngram_proposal([1, 2, 3], 2, max_n=2, recent=recent) == []


def test_greedy_acceptance_keeps_the_agreeing_prefix_and_the_targets_token():
    import torch

    from lmflow_ray.serve.speculative import accept

    logits = torch.zeros(4, 10)
    for position, best in enumerate([3, 5, 9, 1]):
        logits[position, best] = 1.0
    assert accept([3, 5, 2], logits, None).tokens == [3, 5, 9]  # third proposal wrong: the target's 9
    verdict = accept([3, 5, 9], logits, None)
    assert (verdict.tokens, verdict.accepted) == ([3, 5, 9, 1], 3)  # all kept, plus the bonus token
    assert accept([4], logits, None).tokens == [3]


def test_sampled_acceptance_keeps_the_targets_distribution():
    """Proposing one token and accepting it with the target's probability (else sampling from the
    rest) leaves the first token distributed as the target's own sampling."""
    import torch

    from lmflow_ray.serve.speculative import accept

    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log()[None].repeat(2, 1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(6000):
        counts[accept([2], logits, lambda row: torch.softmax(row, -1), generator).tokens[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.02), counts / counts.sum()


# ---- the engine ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def support_adapter(tiny_model_dir, tmp_path_factory):
    return _adapter(tiny_model_dir, tmp_path_factory.mktemp("spec-adapter") / "support", 1)


@pytest.fixture(scope="module")
def draft_dir(tiny_model_dir, tmp_path_factory):
    """The tiny target's first decoder block with its embeddings and head."""
    from lmflow_ray.model.draft import save_truncated

    return save_truncated(tiny_model_dir, 1, tmp_path_factory.mktemp("tiny-draft"))


PROMPTS = ["Please convert the date to ISO format: 2024-01-31. Thanks! You are",
           "The capital of France is Paris. The order number is",
           "Hello, how are you? I'm doing great. How can I help you today?"]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculation_gives_plain_greedy_tokens_in_a_running_batch(method, tiny_model_dir, support_adapter, draft_dir):
    from lmflow_ray.serve.engines import Sampling, TransformersEngine

    spec = {"method": method, "num_speculative_tokens": 4, "draft_folder": draft_dir if method == "draft_model" else None,
            "lookup_recent_replies": 8 if method == "ngram" else 0}
    engine = TransformersEngine(str(tiny_model_dir), {"tiny:support": str(support_adapter)}, threads=1, speculative=spec)
    ids = [engine.encode_text(p) for p in PROMPTS]
    plan = [(ids[0], None, 150), (ids[1], "tiny:support", 40), (ids[2], None, 60)]

    async def staggered():
        first = engine.stream(ids[0], Sampling(max_tokens=150, temperature=0))
        pieces = [await first.__anext__() for _ in range(3)]  # the batch is running now
        others = [asyncio.ensure_future(engine.complete(i, Sampling(max_tokens=n, temperature=0, logprobs=0), a))
                  for i, a, n in plan[1:]]
        pieces += [p async for p in first]
        done = await asyncio.gather(*others)
        return ["".join(p.text for p in pieces), *[d.text for d in done]], done

    try:
        texts, finished = asyncio.run(staggered())
        # a sampled row beside them runs through the same verify step
        sampled = asyncio.run(engine.complete(ids[1], Sampling(max_tokens=30, temperature=0.8, seed=3)))
    finally:
        engine.close()
    assert engine.joined >= 1  # requests joined the running batch
    for (prompt, adapter, n), text in zip(plan, texts):
        expected = [t for t in _reference(tiny_model_dir, support_adapter if adapter else None, prompt, n)
                    if t not in engine.eos_ids]
        assert text == engine.tokenizer.decode(expected, skip_special_tokens=True), (method, adapter)
    for piece in finished:  # one log-prob entry per token, as without speculation
        assert len(piece.logprobs) == piece.completion_tokens + (piece.finish_reason == "stop")
    assert sampled.completion_tokens > 0
    figures = engine.speculation()
    assert figures["method"] == method and figures["verify_forwards"] > 0
    assert 0 < figures["accepted_tokens"] < figures["drafted_tokens"]  # proposals kept and proposals rejected
    assert figures["tokens_per_target_forward"] > 1.0


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    from tiny import tiny_llama, tiny_tokenizer

    from lmflow_ray.errors import UserError
    from lmflow_ray.serve.engines import TransformersEngine

    tok = tiny_tokenizer()
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(tmp_path)
    tiny_llama(len(tok)).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="another tokenizer"):
        TransformersEngine(str(tiny_model_dir), threads=1,
                           speculative={"method": "draft_model", "num_speculative_tokens": 3, "draft_folder": str(tmp_path)})


def test_truncating_keeps_the_first_blocks_and_refuses_a_bad_count(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from lmflow_ray.errors import UserError
    from lmflow_ray.model.draft import truncate

    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    draft = truncate(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 1)
    assert draft.config.num_hidden_layers == 1 and len(draft.model.layers) == 1
    assert torch.equal(draft.model.layers[0].self_attn.q_proj.weight, target.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    with pytest.raises(UserError, match="between 1 and 1"):
        truncate(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 2)


def test_compacting_a_sparse_cache_changes_no_logits(tiny_model_dir):
    """Rejected proposals leave masked columns; moving each row's live columns together (when most
    are masked) must give the next token the same logits."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from lmflow_ray.serve.engines import _Batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(20, 300, (2, 80))
    mask = (torch.rand(2, 80) < 0.3).long()  # most columns masked, as after many rejections
    mask[:, -1] = 1
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        sparse = _Batch(copy.deepcopy(out.past_key_values), mask, [5, 6])
        dense = _Batch(out.past_key_values, mask, [5, 6])
        dense.compact_if_sparse()
        assert dense.mask.shape[1] == int(mask.sum(-1).max()) < 40
        logits = []
        for batch in (sparse, dense):
            step_mask = torch.cat([batch.mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits.append(model(input_ids=torch.tensor([[5], [6]]), attention_mask=step_mask,
                                position_ids=mask.sum(-1, keepdim=True), past_key_values=batch.cache).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_recipe_keys_become_vllms_speculative_config(tmp_path):
    from lmflow_ray.config import load_recipe
    from lmflow_ray.errors import UserError
    from lmflow_ray.serve.sources import Sources
    from lmflow_ray.serve.vllm_app import vllm_speculative

    found = Sources("m", "default")
    spec = load_recipe(None, ["speculative_config.method=ngram", "speculative_config.prompt_lookup_max=4"]).serve.speculative_config
    assert vllm_speculative(spec, found) == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
                                             "prompt_lookup_min": 1}
    serve = load_recipe(None, [f"draft_model={tmp_path}", "gamma=3"]).serve  # LMFlow's names
    assert (serve.speculative_config.method, serve.speculative_config.num_speculative_tokens) == ("draft_model", 3)
    assert vllm_speculative(serve.speculative_config, Sources("m", "default", draft_uri=str(tmp_path))) == {
        "method": "draft_model", "num_speculative_tokens": 3, "model": str(tmp_path)}
    with pytest.raises(UserError, match="folder on each replica"):
        vllm_speculative(serve.speculative_config, Sources("m", "default", draft_uri="s3://b/draft"))
    recent = load_recipe(None, ["speculative_config.lookup_recent_replies=8"]).serve.speculative_config
    with pytest.raises(UserError, match="transformers engine"):
        vllm_speculative(recent, found)
    for bad, message in [(["gamma=3"], "set serve.draft_model"),
                         (["speculative_config.method=draft_model"], "needs model"),
                         ([f"draft_model={tmp_path}", "speculative_config.method=ngram"], "disagree")]:
        with pytest.raises(UserError, match=message):
            load_recipe(None, bad)
