"""Packing: no sample sees another; the packed loss equals the loss of the samples run one by one."""

import numpy as np
import pytest
import torch

from lmflow_ray.data.packing import collate, group_texts, one_per_row, pack
from lmflow_ray.data.templates import get_template
from lmflow_ray.data.tokenize import IGNORE_INDEX, Encoded, encode_rendered
from tiny import tiny_llama, tiny_tokenizer

QUESTIONS = [
    ("Hello, how are you?", "I'm doing great."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Convert 2024/01/31 to ISO.", "2024-01-31"),
    ("Order number please?", "ORD-12345"),
    ("Thanks!", "You are welcome. How can I help you today?"),
    ("Be brief.", "OK."),
    ("Say the order number twice.", "ORD-12345 ORD-12345"),
]


def samples(tok, block_size=4096):
    template = get_template("chatml", tok)
    convs = [{"system": "You are a helpful assistant.", "messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS]
    return encode_rendered([template.render(c) for c in convs], tok, block_size)


def summed_loss(model, batch) -> torch.Tensor:
    """Sum of token cross-entropies (HF shift: logits at t predict labels at t+1)."""
    out = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                attention_mask=None, use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def as_torch(batch):
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def test_pack_keeps_every_sample_whole_and_within_the_block():
    lengths = [5, 9, 3, 7, 7, 2, 10, 1, 4]
    items = [Encoded(list(range(n)), list(range(n))) for n in lengths]
    rows = pack(items, block_size=10)
    assert sorted(n for r in rows for n in r.lengths) == sorted(lengths)
    assert all(sum(r.lengths) == len(r.input_ids) <= 10 for r in rows)
    assert len(rows) == -(-sum(lengths) // 10)  # best fit reaches the lower bound here
    for r in rows:  # the first token of every sample carries no label
        starts = np.cumsum([0] + r.lengths[:-1])
        assert all(r.labels[s] == IGNORE_INDEX for s in starts)


def test_collate_restarts_positions_and_pads_as_its_own_segment():
    rows = [{"input_ids": [7, 8, 9, 4, 5], "labels": [-100, 8, 9, -100, 5], "lengths": [3, 2]}]
    b = collate(rows, pad_token_id=0, pad_to=8)
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b["input_ids"].tolist() == [[7, 8, 9, 4, 5, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 8, 9, -100, 5, -100, -100, -100]]


@pytest.mark.parametrize("batch_rows", [1, 2])
def test_packed_loss_equals_one_by_one(batch_rows):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    items = samples(tok)
    block = 128
    rows = [r.__dict__ for r in pack(items, block_size=block)]
    assert len(rows) < len(items)  # something really was packed together
    with torch.no_grad():
        packed = sum(summed_loss(model, as_torch(collate(rows[i:i + batch_rows], tok.pad_token_id, pad_to=block)))
                     for i in range(0, len(rows), batch_rows))
        alone = sum(summed_loss(model, as_torch(collate([r.__dict__], tok.pad_token_id)))
                    for r in one_per_row(items))
        # Without restarting positions the samples would see each other: the loss must differ.
        leaky = collate(rows, tok.pad_token_id, pad_to=block)
        leaky.pop("position_ids")
        leaked = summed_loss(model, as_torch(leaky))
    assert abs(packed.item() - alone.item()) < 1e-4
    assert abs(leaked.item() - alone.item()) > 1e-3


def test_group_texts_concatenates_documents_into_blocks():
    docs = [Encoded([1, 2, 3], [1, 2, 3]), Encoded([4, 5, 6, 7, 8], [4, 5, 6, 7, 8])]
    rows = group_texts(docs, block_size=3)
    assert [r.input_ids for r in rows] == [[1, 2, 3], [4, 5, 6], [7, 8]]
