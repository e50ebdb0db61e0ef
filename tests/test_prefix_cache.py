"""Prefix caching in the transformers engine: the cache's bookkeeping alone, then the engine, where
requests that share a long prefix (a system prompt) reuse its KV, joining a running batch, base and
LoRA rows side by side, plain and with a draft model, and still give plain generate's tokens."""

import asyncio

import pytest

from test_serve import _adapter, _reference


# ---- the bookkeeping alone -----------------------------------------------------------------------

@pytest.mark.parametrize("a, b, n", [
    ([1, 2, 3], [1, 2, 3, 4], 3),
    ([1, 2, 3], [1, 9, 3], 1),
    ([5], [6], 0),
    ([], [1], 0),
    (list(range(100)), list(range(57)) + [0] * 10, 57),
])
def test_common_prefix(a, b, n):
    from lmflow_ray.serve.prefix import common_prefix

    assert common_prefix(a, b) == n == common_prefix(tuple(b), tuple(a))


def test_prefix_cache_finds_the_longest_shared_prefix_per_adapter_and_drops_least_recent():
    from lmflow_ray.serve.prefix import PrefixCache

    cache = PrefixCache(max_tokens=70, min_tokens=4)
    system = list(range(100, 120))
    cache.add(None, system + [1, 2, 3], "A")
    cache.add(None, system[:6] + [7, 7, 7], "B")
    cache.add("support", system + [1, 2, 3, 4], "C")
    assert cache.find(None, system + [1, 2, 9]) == ("A", 22)  # the longer match of two
    assert cache.find("support", system + [1, 2, 3, 4]) == ("C", 23)  # one token always left to prefill
    assert cache.find(None, [100, 101, 102, 5]) == (None, 0)  # 3 shared tokens: under min_tokens
    assert cache.find("other", system) == (None, 0)  # another adapter's KV is never reused
    cache.add(None, system + [1, 2, 3, 4, 5], "A+")  # extends A: A is dropped
    assert [v for v in cache.entries.values()] == ["B", "C", "A+"]
    assert cache.tokens == 9 + 24 + 25
    cache.add(None, list(range(200, 220)), "D")  # over 70 tokens: the least recently used (B) goes
    assert list(cache.entries.values()) == ["C", "A+", "D"] and cache.tokens == 69
    cache.add(None, list(range(300, 400)), "huge")  # longer than the whole cache: not kept
    assert "huge" not in cache.entries.values()
    figures = cache.describe()
    assert figures["hits"] == 2 and figures["reused_prompt_tokens"] == 45 and figures["lookups"] == 4


# ---- the engine ----------------------------------------------------------------------------------

SYSTEM = ("You are a support-desk assistant. Read the customer's e-mail and reply with the order number "
          "only, written as ORD- followed by its six digits. ")
TAILS = ["The grinder (order 123456) broke.", "My order 654321 came late, sorry", "Where is 111222?",
         "Hello there"]


def _logprobs(base_dir, adapter_dir, prompt, tokens):
    """Each of ``tokens``' log-probs after ``prompt`` (and the tokens before it), from one forward."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.inference_mode():
        logits = model.eval()(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


@pytest.fixture(scope="module")
def support_adapter(tiny_model_dir, tmp_path_factory):
    return _adapter(tiny_model_dir, tmp_path_factory.mktemp("prefix-adapter") / "support", 1)


@pytest.mark.parametrize("method", [None, "draft_model"])
def test_shared_prefixes_are_reused_with_the_same_greedy_tokens(method, tiny_model_dir, support_adapter, tmp_path):
    from lmflow_ray.model.draft import save_truncated
    from lmflow_ray.serve.engines import Sampling, TransformersEngine

    spec = {"method": method, "num_speculative_tokens": 3, "draft_folder": save_truncated(tiny_model_dir, 1, tmp_path)} \
        if method else None
    engine = TransformersEngine(str(tiny_model_dir), {"tiny:support": str(support_adapter)}, threads=1,
                                speculative=spec, prefix_cache_tokens=4096)
    ids = [engine.encode_text(SYSTEM + t) for t in TAILS]
    plan = [(ids[0], None, 40), (ids[1], None, 12), (ids[2], "tiny:support", 12), (ids[3], None, 12),
            (ids[2], None, 12)]

    async def run():
        await engine.complete(ids[3], Sampling(max_tokens=2, temperature=0), "tiny:support")  # the adapter's cache
        first = engine.stream(plan[0][0], Sampling(max_tokens=40, temperature=0))
        pieces = [await first.__anext__() for _ in range(2)]  # a running batch that the others join
        others = [asyncio.ensure_future(engine.complete(i, Sampling(max_tokens=n, temperature=0, logprobs=0), a))
                  for i, a, n in plan[1:]]
        pieces += [p async for p in first]
        # a request asking for its prompt's log-probs is prefilled whole, beside a cached one
        scored = await engine.complete(ids[1], Sampling(max_tokens=1, temperature=0, prompt_logprobs=0))
        done = await asyncio.gather(*others)
        return ["".join(p.text for p in pieces), *[d.text for d in done]], done, scored

    try:
        texts, done, scored = asyncio.run(run())
    finally:
        engine.close()
    assert engine.joined >= 1
    for (prompt, adapter, n), text in zip(plan, texts):
        expected = [t for t in _reference(tiny_model_dir, support_adapter if adapter else None, prompt, n)
                    if t not in engine.eos_ids]
        assert text == engine.tokenizer.decode(expected, skip_special_tokens=True), (method, adapter, n)
    for (prompt, adapter, _), piece in zip(plan[1:], done):  # reused KV gives the log-probs a full forward gives
        tokens = [t for t, _, _ in piece.logprobs]
        expected = _logprobs(tiny_model_dir, support_adapter if adapter else None, prompt, tokens)
        assert max(abs(a - b) for (_, a, _), b in zip(piece.logprobs, expected)) < 2e-5, (method, adapter)
    assert len(scored.prompt_logprobs) == len(ids[1]) and scored.prompt_logprobs[0] is None
    figures = engine.prefix_caching()
    shared = len(engine.encode_text(SYSTEM)) - 2  # its last tokens may merge with what follows
    assert figures["hits"] >= 3, figures  # the system prompt of the base rows (the adapter's own once warm)
    assert figures["reused_prompt_tokens"] >= 3 * shared, figures
