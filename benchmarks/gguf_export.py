"""GGUF export: each outtype's file, how close transformers' reload of it stays to the source
model, and llama.cpp itself on it, on held-out e-mails of the shipped task.

    .venv/bin/python benchmarks/gguf_export.py [--model default] [--emails 20] [--out benchmarks/results/gguf_export.json]

``--model``: any model lmflow-ray finds (a folder, run or checkpoint; a LoRA run is merged), e.g.
``output_models/support_orders/demo`` after ``make demo``. For every outtype:
- the export's seconds and the file's MiB;
- transformers' GGUF loader on the file against the source in fp32, on the e-mails: the greedy
  tokens that agree position by position (32 new tokens each), and the NLL per reference-answer
  token (teacher-forced) next to the source's;
- llama.cpp (node-llama-cpp, ``make llamacpp``) on the file, one thread: the same agreement, the
  held-out accuracy of its answers, and its decode tokens/s.
The source's own accuracy and tokens/s (transformers, fp32, every core) come first; llama.cpp runs
one thread, its fastest here (two decode the 135M model slower on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_1", "q4_0")
NEW_TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--emails", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gguf_export.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.eval import metrics
    from lmflow_ray.model.export import export_gguf
    from lmflow_ray.model.llamacpp import LlamaCpp, render
    from lmflow_ray.model.load import load_for_inference, tokenizer_folder
    from lmflow_ray.model.locate import exact_uri, local_folder, split_adapter

    torch.set_num_threads(os.cpu_count() or 1)
    base_uri, adapter_uri = split_adapter(exact_uri(args.model, None, "--model"), None)
    base = local_folder(base_uri, None)
    adapter = local_folder(adapter_uri, None) if adapter_uri else None
    source = load_for_inference(base, {"default": adapter} if adapter else None, dtype="float32", merge=bool(adapter))
    tok = AutoTokenizer.from_pretrained(tokenizer_folder(base, adapter))
    data = json.loads((REPO / "jobs/data/support_orders/heldout/heldout.json").read_text())["instances"][: args.emails]
    chats = [[{"role": "system", "content": i["system"]}, *i["messages"][:-1]] for i in data]
    refs = [i["messages"][-1]["content"] for i in data]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    answer_ids = [tok(r + tok.eos_token, add_special_tokens=False).input_ids for r in refs]

    def greedy(model):
        out, started, made = [], time.time(), 0
        for ids in prompt_ids:
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            new = gen[0, len(ids):].tolist()
            if tok.eos_token_id in new:  # as llama.cpp's answers: up to the end of the turn, without it
                new = new[: new.index(tok.eos_token_id)]
            made += len(new)
            out.append(new)
        return out, made / (time.time() - started)

    def nll(model):
        total, count = 0.0, 0
        for p, a in zip(prompt_ids, answer_ids):
            ids = torch.tensor([p + a])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, len(p) - 1:-1].float(), -1)
            total -= float(logp[torch.arange(len(a)), torch.tensor(a)].sum())
            count += len(a)
        return total / count

    def agree(a, b):
        pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb + [None] * len(ra))]
        return sum(x == y for x, y in pairs) / len(pairs)

    def accuracy(token_lists):
        texts = [tok.decode(ts, skip_special_tokens=True).strip() for ts in token_lists]
        return sum(metrics.judge("text", t, r, []) for t, r in zip(texts, refs)) / len(refs)

    plain, plain_tps = greedy(source)
    report = {"benchmark": "gguf_export", "model": args.model, "emails": len(data), "new_tokens": NEW_TOKENS,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "source": {"accuracy": accuracy(plain), "nll": nll(source), "tokens_per_s_with_prefill": plain_tps}, "files": []}
    print(json.dumps(report["source"]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    for outtype in OUTTYPES:
        path = work / f"model-{outtype}.gguf"
        started = time.time()
        done = export_gguf(args.model, str(path), outtype)
        row = {"outtype": outtype, "export_s": time.time() - started, "mib": done.bytes / 2**20, "tensors": done.tensors}
        loaded = AutoModelForCausalLM.from_pretrained(work, gguf_file=path.name, dtype=torch.float32).eval()
        tokens, _ = greedy(loaded)
        row.update(transformers_agreement=agree(plain, tokens), transformers_nll=nll(loaded))
        del loaded
        runner = LlamaCpp(path, threads=1, context=2048)
        try:
            cpp, started, made = [], time.time(), 0
            for chat in chats:
                _, ids = runner.generate(render(tok, chat), NEW_TOKENS)
                cpp.append(ids)
                made += len(ids)
            row.update(llamacpp_agreement=agree(plain, cpp), llamacpp_accuracy=accuracy(cpp),
                       llamacpp_tokens_per_s_with_prefill=made / (time.time() - started))
        finally:
            runner.close()
        path.unlink()
        print(json.dumps(row), flush=True)
        report["files"].append(row)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
