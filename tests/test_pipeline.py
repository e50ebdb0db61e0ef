"""The Ray Data pipeline on a real local Ray cluster and a real S3 server (SeaweedFS)."""

import collections
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lmflow_ray.data.sources as sources
from lmflow_ray.config import load_recipe
from lmflow_ray.data.packing import collate_columns
from lmflow_ray.data.pipeline import Spec, build_dataset, dataset_stats, encode
from lmflow_ray.data.tokenize import IGNORE_INDEX

pytestmark = pytest.mark.slow

WORDS = "order number date paris help refund the a is to of and late box item ship please thanks".split()


def chat_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 30)))},
                      {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 20)))}]
        row = {"messages": turns}
        if i % 3 == 0:
            row["system"] = "You are a helpful assistant."
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def samples_of(rows_out):
    """Packed rows -> multiset of (ids, labels after the first token), one entry per sample."""
    out = collections.Counter()
    for ids, labels, lengths in zip(rows_out["input_ids"], rows_out["labels"], rows_out["lengths"]):
        start = 0
        for n in lengths:
            out[(tuple(ids[start:start + n]), tuple(labels[start + 1:start + n]))] += 1
            start += n
    return out


def expected_samples(rows, model_dir, block_size):
    spec = Spec(str(model_dir), False, "chatml", "conversation", block_size, False, True)
    from lmflow_ray.data.formats import check_instance

    encoded = encode([check_instance("conversation", r) for r in rows], spec)
    return collections.Counter((tuple(e.input_ids), tuple(e.labels[1:])) for e in encoded)


def rows_of_shard(shard):
    """(instance, (shard, its index there)) for every instance of one shard, read as the pipeline does."""
    return [(rec.instance, (shard.to_dict(), i)) for i, rec in enumerate(sources.read_shard(shard))]


def collect(ds):
    cols = collections.defaultdict(list)
    for batch in ds.iter_batches(batch_size=256, batch_format="numpy"):
        for key in ("input_ids", "labels", "lengths"):
            cols[key] += [list(x) for x in batch[key]]
    return cols


def recipe_for(path, model_dir, **extra):
    overrides = [f"dataset_path={path}", f"model_name_or_path={model_dir}", "conversation_template=chatml",
                 "block_size=256", "preprocessing_batch_size=200"] + [f"{k}={v}" for k, v in extra.items()]
    return load_recipe(None, overrides)


def test_sharded_jsonl_on_ray_equals_one_process(tmp_path, ray_local, tiny_model_dir, monkeypatch):
    rows = chat_rows(1500)
    write_jsonl(tmp_path / "chat.jsonl", rows)
    monkeypatch.setattr(sources, "SHARD_BYTES", 40_000)  # many shards, lines cut at shard borders
    recipe = recipe_for(tmp_path / "chat.jsonl", tiny_model_dir)
    assert len(sources.open_dataset(str(tmp_path / "chat.jsonl")).shards) > 5
    got = collect(build_dataset(recipe))
    assert samples_of(got) == expected_samples(rows, tiny_model_dir, 256)  # every line once, same tokens
    assert all(len(ids) <= 256 for ids in got["input_ids"])
    tokens = sum(len(ids) for ids in got["input_ids"])
    assert len(got["input_ids"]) < len(rows) and tokens / (256 * len(got["input_ids"])) > 0.85  # really packed

    # validation_split_percentage: a fixed split of the samples, the same on every build, the two
    # sides disjoint and together everything; max_train_samples: the first N of the train side.
    split = recipe_for(tmp_path / "chat.jsonl", tiny_model_dir, validation_split_percentage=20)
    train, held = samples_of(collect(build_dataset(split))), samples_of(collect(build_dataset(split, side="validation")))
    assert train + held == samples_of(got) and 0.15 < sum(held.values()) / len(rows) < 0.25
    assert samples_of(collect(build_dataset(split, side="validation"))) == held
    first = recipe_for(tmp_path / "chat.jsonl", tiny_model_dir, validation_split_percentage=20, max_train_samples=333,
                       preprocessing_num_workers=2)
    from lmflow_ray.data.pipeline import held_out

    ordered = [pair for shard in sources.open_dataset(str(tmp_path / "chat.jsonl")).shards for pair in rows_of_shard(shard)]
    wanted = [r for r, (shard, i) in ordered if not held_out(shard, i, 20)][:333]
    assert samples_of(collect(build_dataset(first))) == expected_samples(wanted, tiny_model_dir, 256)


def test_s3_dataset_gives_the_same_rows_as_local(tmp_path, ray_local, tiny_model_dir, s3_server, monkeypatch):
    rows = chat_rows(400, seed=1)
    write_jsonl(tmp_path / "chat.jsonl", rows)
    fs = s3_server.filesystem()
    fs.create_dir("datasets")
    with fs.open_output_stream("datasets/chat/part-0.jsonl") as f:
        f.write((tmp_path / "chat.jsonl").read_bytes())
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    local = samples_of(collect(build_dataset(recipe_for(tmp_path / "chat.jsonl", tiny_model_dir))))
    remote = samples_of(collect(build_dataset(recipe_for("s3://datasets/chat", tiny_model_dir))))
    assert remote == local and sum(local.values()) == 400


def test_parquet_row_groups_and_fastchat_shape(tmp_path, ray_local, tiny_model_dir):
    rows = chat_rows(300, seed=2)
    fastchat = [{"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                   for m in r["messages"]]} for r in rows]
    pq.write_table(pa.Table.from_pylist(fastchat), tmp_path / "chat.parquet", row_group_size=64)
    got = samples_of(collect(build_dataset(recipe_for(tmp_path / "chat.parquet", tiny_model_dir))))
    plain = [{"messages": r["messages"]} for r in rows]
    assert got == expected_samples(plain, tiny_model_dir, 256)


def test_text_only_is_grouped_into_full_blocks(tmp_path, ray_local, tiny_model_dir):
    docs = [{"text": " ".join(random.Random(i).choices(WORDS, k=80))} for i in range(50)]
    (tmp_path / "t.json").write_text(json.dumps({"type": "text_only", "instances": docs}))
    got = collect(build_dataset(recipe_for(tmp_path / "t.json", tiny_model_dir, block_size=64)))
    sizes = [len(x) for x in got["input_ids"]]
    assert sizes.count(64) >= len(sizes) - 1  # all full but the tail of a batch
    assert all(lab == ids for lab, ids in zip(got["labels"], got["input_ids"]))


def test_stats_report_packing_against_pad_to_block(tmp_path, ray_local, tiny_model_dir):
    rows = chat_rows(600, seed=3)
    write_jsonl(tmp_path / "chat.jsonl", rows)
    stats = dataset_stats(recipe_for(tmp_path / "chat.jsonl", tiny_model_dir))
    lengths = [len(ids) for ids, _ in expected_samples(rows, tiny_model_dir, 256).elements()]
    assert stats["samples"] == 600 and stats["tokens"] == sum(lengths)
    assert stats["pad_to_block_efficiency"] == pytest.approx(sum(lengths) / (600 * 256))
    assert stats["packing_efficiency"] > 0.9 > stats["pad_to_block_efficiency"]
    unpacked = dataset_stats(recipe_for(tmp_path / "chat.jsonl", tiny_model_dir, packing="false"))
    assert unpacked["rows_packed"] == 600


def segments_of(rows):
    """(ids, labels[1:]) of every segment of packed rows, in order."""
    out = []
    for r in rows:
        at = 0
        for n in r["lengths"]:
            out.append((tuple(r["input_ids"][at:at + n]), tuple(r["labels"][at + 1:at + n])))
            at += n
    return out


def test_paired_conversations_pack_whole_pairs_and_are_counted(tmp_path, ray_local, tiny_model_dir):
    rows = chat_rows(40, seed=6)
    pairs = [{"chosen": r, "rejected": {"messages": r["messages"][:-1] + [{"role": "assistant", "content": "no"}]}}
             for r in rows]
    (tmp_path / "p.json").write_text(json.dumps({"type": "paired_conversation", "instances": pairs}))
    # mask_prompt=false: each side is trained as SFT trains it (every assistant turn).
    got = build_dataset(recipe_for(tmp_path / "p.json", tiny_model_dir, mask_prompt="false", block_size=1024)).take_all()
    assert sum(len(r["lengths"]) for r in got) == 80 and len(got) < 40  # pairs share rows
    assert all(len(r["input_ids"]) <= 2 * 1024 and len(r["margins"]) * 2 == len(r["lengths"]) for r in got)
    segments = segments_of(got)
    assert collections.Counter(segments[0::2]) == expected_samples(rows, tiny_model_dir, 1024)  # chosen, then rejected
    # mask_prompt (the default): only the final replies are trained, the rejected one being "no"; at
    # block_size 256 long conversations lose the start of their prompt, never the reply.
    masked = build_dataset(recipe_for(tmp_path / "p.json", tiny_model_dir)).take_all()
    for ids, labels in segments_of(masked)[1::2]:
        at = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        assert 0 < len(at) <= 4 and at == list(range(at[0], at[-1] + 1))  # one short run: "no" and its end token
    stats = dataset_stats(recipe_for(tmp_path / "p.json", tiny_model_dir))
    tokens = sum(len(r["input_ids"]) for r in masked)
    trained = sum(int((np.asarray(r["labels"]) != IGNORE_INDEX).sum()) for r in masked)
    assert (stats["samples"], stats["rows_packed"], stats["tokens"], stats["trained_tokens"]) == (40, len(masked), tokens, trained)
    assert stats["packing_efficiency"] == pytest.approx(tokens / (len(masked) * 512))
    assert stats["pad_to_block_efficiency"] == pytest.approx(tokens / (40 * 512))


def test_batches_feed_a_model_through_the_collate_function(tmp_path, ray_local, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    write_jsonl(tmp_path / "chat.jsonl", chat_rows(100, seed=4))
    ds = build_dataset(recipe_for(tmp_path / "chat.jsonl", tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batches = ds.iter_torch_batches(batch_size=4, collate_fn=lambda b: {
        k: torch.from_numpy(v) for k, v in collate_columns(b, pad_token_id=0, pad_to=256).items()})
    batch = next(iter(batches))
    assert batch["input_ids"].shape == (4, 256)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False)
    assert torch.isfinite(out.loss)


def test_ray_train_workers_read_their_shards(tmp_path, ray_local, tiny_model_dir):
    """Ready for ray.train.get_dataset_shard: two workers split the rows between them."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    write_jsonl(tmp_path / "chat.jsonl", chat_rows(300, seed=5))
    ds = build_dataset(recipe_for(tmp_path / "chat.jsonl", tiny_model_dir))
    total_rows = len(collect(ds)["input_ids"])
    out = tmp_path / "counts"
    out.mkdir()

    def loop(_):
        shard = ray.train.get_dataset_shard("train")
        rows = sum(len(b["input_ids"]) for b in shard.iter_batches(batch_size=8, batch_format="numpy"))
        (out / f"rank{ray.train.get_context().get_world_rank()}").write_text(str(rows))
        ray.train.report({"rows": rows})

    TorchTrainer(loop, datasets={"train": ds},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="shard-check")).fit()
    counts = [int((out / f"rank{r}").read_text()) for r in (0, 1)]
    # Ray Train splits with equal=True: each worker gets the same number of rows (an odd one is left out).
    assert counts == [total_rows // 2] * 2


def test_bad_row_in_a_ray_task_is_one_clean_line(tmp_path, repo_python):
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
                                      + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}) + "\n")
    proc = repo_python("-m", "lmflow_ray.cli", "data", "stats", "--dataset_path", str(tmp_path), "--conversation_template", "chatml")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == f"{tmp_path}/d.jsonl:2: messages[1].role: unknown role 'bot' (expected one of system, user, assistant, tool)"
