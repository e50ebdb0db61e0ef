"""DPO against SFT on the same preference pairs, one training process each, the embedded
SmolLM2-135M-Instruct on CPU (the objectives' own collate + loss, as Ray Train workers run them):

- SFT on the chosen sides (packed rows) -- the baseline;
- DPO, full fine-tuning, reference log-probs precomputed (what lmflow-ray does);
- DPO, full fine-tuning, a live reference model resident next to the policy (TRL's default);
- DPO, LoRA, the reference = the base with the adapter disabled (lmflow-ray's LoRA default);
- DPO, LoRA, reference log-probs precomputed;
- the reference pass itself (one forward over every pair).

    .venv/bin/python benchmarks/align_throughput.py [--pairs 96] [--steps 6] [--out benchmarks/results/align_throughput.json]

Each case runs in a fresh process (so peak memory is its own): real tokens/s counts every
non-padding token the step processed (both sides for DPO); peak memory is the process's resident
size sampled every 20 ms. Step 1 is left out (warm-up). Ratios are what to quote: absolute
numbers move with the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LORA = dict(use_lora=True, lora_r=16, lora_alpha=32, lora_dropout=0.0,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
CASES = {
    "sft": dict(objective="sft", lora=False, reference="none"),
    "dpo_full_precomputed": dict(objective="dpo", lora=False, reference="precomputed"),
    "dpo_full_live_model": dict(objective="dpo", lora=False, reference="live_model"),
    "dpo_lora_adapter_disabled": dict(objective="dpo", lora=True, reference="adapter"),
    "dpo_lora_precomputed": dict(objective="dpo", lora=True, reference="precomputed"),
    "sft_lora": dict(objective="sft", lora=True, reference="none"),
}


def rows(kind: str, pairs: int, block: int) -> list[dict]:
    """Packed rows from the shipped preference pairs: pair rows, or SFT rows of their chosen sides."""
    from lmflow_ray.data.formats import check_instance
    from lmflow_ray.data.pipeline import Spec, process
    from lmflow_ray.embedded import resolve_model_path

    data = json.loads((REPO / "jobs/data/support_preferences/train/train.json").read_text())["instances"][:pairs]
    model = resolve_model_path("default")
    if kind == "dpo":
        spec = Spec(model, False, "tokenizer", "paired_conversation", block, False, True)
        out = process([check_instance("paired_conversation", p) for p in data], spec)
    else:
        spec = Spec(model, False, "tokenizer", "conversation", 2 * block, False, True)
        out = process([check_instance("conversation", p["chosen"]) for p in data], spec)
    keys = [k for k in ("input_ids", "labels", "lengths", "margins") if k in out]
    return [{k: out[k][i] for k in keys} for i in range(len(out["input_ids"]))]


def case(name: str, pairs: int, steps: int, block: int, queue) -> None:
    import numpy as np
    import torch

    from lmflow_ray.config import ModelSection
    from lmflow_ray.data.tokenize import load_tokenizer
    from lmflow_ray.embedded import resolve_model_path
    from lmflow_ray.model.adapters import apply_lora
    from lmflow_ray.model.load import load_model
    from lmflow_ray.train.objectives import DPO, SFT, segment_logps
    from lmflow_ray.train.observe import MemoryPeak

    torch.manual_seed(0)
    spec = CASES[name]
    device = torch.device("cpu")
    memory = MemoryPeak(device)
    section = ModelSection(model_name_or_path="default", **(LORA if spec["lora"] else {}))
    pad = load_tokenizer(resolve_model_path("default")).pad_token_id
    model = load_model(section)
    if spec["lora"]:
        model = apply_lora(model, section)
    data = rows(spec["objective"], pairs, block)
    objective = SFT() if spec["objective"] == "sft" else DPO(0.1, "sigmoid", 0.0, 0.5, 1.0, spec["reference"] == "adapter")
    objective.attach(model)
    reference_s = None
    reference = None
    if spec["reference"] == "live_model":
        reference = load_model(ModelSection(model_name_or_path="default")).eval()
    if spec["reference"] == "precomputed":  # the pass, timed: one no-grad forward of the base over every row
        started = time.perf_counter()
        base = model if not spec["lora"] else None
        ref_model = load_model(ModelSection(model_name_or_path="default")).eval() if base is None else base
        with torch.no_grad():
            for row in data:
                arrays = objective.collate({k: [row[k]] for k in row}, pad, None)
                inputs = {k: torch.from_numpy(v) for k, v in arrays.items()}
                logits = ref_model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
                row["ref_logps"] = segment_logps(logits, inputs["labels"], inputs["segments"], len(arrays["ends"]))[0].numpy()
        reference_s = time.perf_counter() - started
        if base is None:
            del ref_model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    times, tokens = [], []
    memory.take()
    for step in range(steps):
        row = data[step % len(data)]
        batch = {k: [row[k]] for k in row}
        started = time.perf_counter()
        inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in objective.collate(batch, pad, None).items()}
        if reference is not None:  # TRL's way: the reference model's forward inside the step
            with torch.no_grad():
                logits = reference(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"]).logits
                inputs["ref_logps"] = segment_logps(logits, inputs["labels"], inputs["segments"], len(inputs["ends"]))[0]
        loss, _ = objective.loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        tokens.append(len(row["input_ids"]))
    peak = memory.take()
    timed = slice(1, None)
    queue.put({"case": name, **spec, "steps_timed": steps - 1, "rows": len(data),
               "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
               "step_time_s": statistics.median(times[timed]), "peak_memory_mb": peak / 2**20,
               "reference_pass_s": reference_s,
               "reference_pass_rows_per_s": len(data) / reference_s if reference_s else None})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/align_throughput.json"))
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for name in CASES:
        queue = ctx.Queue()
        proc = ctx.Process(target=case, args=(name, args.pairs, args.steps, args.block, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        print(json.dumps(results[-1]), flush=True)
    by = {r["case"]: r for r in results}
    sft, sft_lora = by["sft"], by["sft_lora"]
    ratios = {
        "dpo_full_precomputed_tokens_per_s_vs_sft": by["dpo_full_precomputed"]["tokens_per_s"] / sft["tokens_per_s"],
        "dpo_full_precomputed_memory_vs_sft": by["dpo_full_precomputed"]["peak_memory_mb"] / sft["peak_memory_mb"],
        "dpo_full_live_model_tokens_per_s_vs_sft": by["dpo_full_live_model"]["tokens_per_s"] / sft["tokens_per_s"],
        "dpo_full_live_model_memory_vs_sft": by["dpo_full_live_model"]["peak_memory_mb"] / sft["peak_memory_mb"],
        "dpo_lora_adapter_disabled_tokens_per_s_vs_sft_lora": by["dpo_lora_adapter_disabled"]["tokens_per_s"] / sft_lora["tokens_per_s"],
        "dpo_lora_precomputed_tokens_per_s_vs_sft_lora": by["dpo_lora_precomputed"]["tokens_per_s"] / sft_lora["tokens_per_s"],
        "dpo_lora_adapter_disabled_memory_vs_sft_lora": by["dpo_lora_adapter_disabled"]["peak_memory_mb"] / sft_lora["peak_memory_mb"],
    }
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "command": "benchmarks/align_throughput.py " + " ".join(sys.argv[1:]), "pairs": args.pairs,
           "steps": args.steps, "block_size": args.block, "cases": results, "ratios": ratios}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
