"""`lmflow-ray draft` end to end on the session's Ray cluster: a tiny target answers training
prompts (greedy), its first block is cut out and trained on those replies, and the draft it
makes serves beside the target with speculation, giving the target's own greedy tokens."""

import asyncio
import json

import pytest

from lmflow_ray.config import load_recipe

pytestmark = pytest.mark.slow


def test_a_draft_is_cut_from_its_target_tuned_on_its_replies_and_serves_beside_it(ray_local, tiny_model_dir, orders,
                                                                                   tmp_path):
    from transformers import AutoConfig

    from lmflow_ray.align.draft import run_draft
    from lmflow_ray.model.locate import exact_uri
    from lmflow_ray.serve.engines import Sampling, TransformersEngine

    recipe = load_recipe(None, [f"model_name_or_path={tiny_model_dir}", f"dataset_path={orders}",
                                "conversation_template=chatml", "block_size=256", "num_workers=1",
                                "per_device_train_batch_size=2", "max_steps=3", "learning_rate=1e-3", "logging_steps=1",
                                f"output_model_path={tmp_path}", "run_name=draft", "draft_layers=1",
                                "draft_prompts=6", "draft_max_new_tokens=8", "inference_batch_size_per_device=8"])
    said = []
    result = run_draft(recipe, say=said.append)
    text = "\n".join(said)
    assert "the target answers 6 prompts" in text and "kept 1 of the target's 2 decoder blocks" in text
    replies = json.loads((tmp_path / "draft" / "replies" / "replies.json").read_text())
    assert replies["type"] == "conversation" and len(replies["instances"]) == 6
    assert all(i["messages"][-1]["role"] == "assistant" for i in replies["instances"])
    assert (result.layers, result.target_layers, result.replies) == (1, 2, 6)

    draft = exact_uri(result.draft_uri, None, "draft")
    assert AutoConfig.from_pretrained(draft).num_hidden_layers == 1
    engine = TransformersEngine(str(tiny_model_dir), threads=1,
                                speculative={"method": "draft_model", "num_speculative_tokens": 3, "draft_folder": draft})
    plain = TransformersEngine(str(tiny_model_dir), threads=1)
    try:
        ids = engine.encode_text("The capital of France is Paris. The order number is")
        got = asyncio.run(engine.complete(ids, Sampling(max_tokens=24, temperature=0)))
        want = asyncio.run(plain.complete(ids, Sampling(max_tokens=24, temperature=0)))
    finally:
        engine.close()
        plain.close()
    assert got.text == want.text and engine.speculation()["drafted_tokens"] > 0

    again = []  # run again: each stage finds its output and is skipped
    run_draft(recipe, say=again.append)
    assert "replies: already in" in "\n".join(again) and "already trained" in "\n".join(again)
