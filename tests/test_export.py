"""GGUF export (lmflow-ray export --format gguf): files that read back, reload in transformers' GGUF
loader as the model they came from, run in llama.cpp, and refusals for what llama.cpp cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmflow_ray.errors import UserError
from lmflow_ray.model.export import export_gguf, pre_tokenizer

PROMPTS = ["The order number is ORD-12345.", "Hello, how are you? I'm", "Please convert the date to ISO format:"]


def _fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items()
                    if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}


def _greedy(model, tok, prompts, n):
    import torch

    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def test_every_outtype_reads_back_and_reloads_in_transformers_as_the_source(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(" ".join(PROMPTS), return_tensors="pt").input_ids
    with torch.no_grad():
        want = source(ids).logits
    plain = _greedy(source, tok, PROMPTS, 16)
    worst = {"f32": 1e-5, "f16": 1e-2, "q8_0": 5e-2, "q4_0": 0.5, "q4_1": 0.5, "bf16": 5e-2}
    for outtype, limit in worst.items():
        path = tmp_path / f"tiny-{outtype}.gguf"
        done = export_gguf(str(tiny_model_dir), str(path), outtype)
        assert done.path == str(path) and path.stat().st_size == done.bytes
        reader, fields = _fields(path)
        assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "gpt-2"
        assert fields["llama.block_count"] == source.config.num_hidden_layers
        assert fields["llama.attention.head_count_kv"] == source.config.num_key_value_heads
        assert len(reader.fields["tokenizer.ggml.tokens"].data) == source.config.vocab_size
        assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
        assert fields["tokenizer.chat_template"] == tok.chat_template
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay F32 in every file
        expect = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}[outtype]
        assert types["blk.0.attn_q.weight"] == expect and types["blk.1.ffn_down.weight"] == expect
        if outtype.startswith("q4"):  # as llama.cpp's own Q4 files: the embedding and head at Q8_0
            assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"

        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            got = loaded(ids).logits
        gap = float((got - want).abs().max())
        assert gap < limit, (outtype, gap)
        if outtype in ("f32", "f16"):
            assert _greedy(loaded, tok, PROMPTS, 16) == plain, outtype
        if outtype == "q8_0":  # the next token at every position of the text (a random model's greedy
            # runs part ways at the first near tie, so free-running agreement is measured on the real model)
            assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.95
        gguf_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert [gguf_tok(p).input_ids for p in PROMPTS] == [tok(p).input_ids for p in PROMPTS]


def test_pre_tokenizers_are_named_as_llama_cpp_names_them():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bpe = {"type": "BPE", "byte_fallback": False}
    assert pre_tokenizer({"model": bpe, "pre_tokenizer": byte_level}, "m") == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer({"model": bpe, "pre_tokenizer": digits}, "m") == "smollm"
    split = lambda regex: {"type": "Sequence", "pretokenizers": [  # noqa: E731
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        dict(byte_level, use_regex=False)]}
    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    assert pre_tokenizer({"model": bpe, "pre_tokenizer": split(llama3)}, "m") == "llama-bpe"
    assert pre_tokenizer({"model": bpe, "pre_tokenizer": split(qwen2)}, "m") == "qwen2"
    with pytest.raises(UserError, match=r"m/tokenizer.json: pre_tokenizer .*Whitespace"):
        pre_tokenizer({"model": bpe, "pre_tokenizer": {"type": "Whitespace"}}, "m")
    with pytest.raises(UserError, match="byte fallback"):
        pre_tokenizer({"model": dict(bpe, byte_fallback=True), "pre_tokenizer": byte_level}, "m")
    with pytest.raises(UserError, match="a Unigram tokenizer"):
        pre_tokenizer({"model": {"type": "Unigram"}, "pre_tokenizer": byte_level}, "m")


def test_what_llama_cpp_cannot_read_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, repo_python):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny import tiny_tokenizer

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400)).save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    out = tmp_path / "out"
    proc = repo_python("-m", "lmflow_ray", "export", "--format", "gguf", "--model_name_or_path", str(gpt2),
                       "--output_model_path", str(out / "gpt2.gguf"), "--outtype", "q8_0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{gpt2}/config.json: architectures 'GPT2LMHeadModel'" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not list(out.iterdir())  # nothing written, not even a temporary file

    kept = tmp_path / "notes.gguf"
    kept.write_text("my notes")
    with pytest.raises(UserError, match="exists and is not a GGUF file; refusing to replace it"):
        export_gguf(str(tiny_model_dir), str(kept), "f16")
    assert kept.read_text() == "my notes"
    with pytest.raises(UserError, match="is a folder"):
        export_gguf(str(tiny_model_dir), str(_folder(tmp_path / "a.gguf")), "f16")
    with pytest.raises(UserError, match="must name a .gguf file"):
        export_gguf(str(tiny_model_dir), str(tmp_path / "model.bin"), "f16")

    # An earlier GGUF file at the named path is replaced whole.
    again = tmp_path / "again.gguf"
    export_gguf(str(tiny_model_dir), str(again), "f32")
    first = again.stat().st_size
    export_gguf(str(tiny_model_dir), str(again), "q8_0")
    assert again.stat().st_size < first and again.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.slow
def test_the_embedded_model_as_gguf_answers_held_out_emails_as_in_transformers_and_in_llama_cpp(tmp_path):
    """SmolLM2-135M-Instruct on eight held-out e-mails, 24 greedy tokens each. The untuned model's
    first tokens are near ties (its top three within 0.1 nats), so a free-running q8_0 answer can
    part ways at one of them: q8_0 is judged token by token, on the fp32 model's answers and on
    llama.cpp's own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import REPO
    from lmflow_ray.embedded import prepare_default_model
    from lmflow_ray.model.llamacpp import LlamaCpp, gguf_tokenizer, render

    source_dir = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(source_dir)
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    data = json.loads((REPO / "jobs/data/support_orders/heldout/heldout.json").read_text())["instances"][:8]
    chats = [[{"role": "system", "content": i["system"]}, *i["messages"][:-1]] for i in data]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]

    def answers(model):
        out = []
        for ids in prompt_ids:
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(gen[0, len(ids):].tolist())
        return out

    def gaps(model, continuations):  # per token: how far below the model's best next token it is (nats)
        out = []
        for ids, cont in zip(prompt_ids, continuations):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids + cont])).logits[0, len(ids) - 1:-1], -1)
            out += (logp.max(-1).values - logp[torch.arange(len(cont)), torch.tensor(cont)]).tolist()
        return out

    plain = answers(source)
    for outtype in ("f16", "q8_0"):
        export_gguf("default", str(tmp_path / f"smollm2-{outtype}.gguf"), outtype)
    f16 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smollm2-f16.gguf", dtype=torch.float32).eval()
    assert answers(f16) == plain  # f16: the same greedy answers, free-running
    q8 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smollm2-q8_0.gguf", dtype=torch.float32).eval()
    on_plain = gaps(q8, plain)  # q8_0 picks the fp32 answer's next token at >= 95% of its positions
    assert sum(g == 0 for g in on_plain) / len(on_plain) >= 0.95

    # llama.cpp itself: its own tokenizer on the file's chat template, its own Q8_0 kernels.
    gtok = gguf_tokenizer(tmp_path / "smollm2-q8_0.gguf")
    assert [render(gtok, c) for c in chats] == prompts
    runner = LlamaCpp(tmp_path / "smollm2-q8_0.gguf", threads=1)
    try:
        cpp = []
        for p, ids in zip(prompts, prompt_ids):
            cpp.append(runner.generate(p, 24)[1])
            assert runner.last["prompt_tokens"] == len(ids)
    finally:
        runner.close()
    behind = gaps(source, cpp)  # what the fp32 model thinks of every token llama.cpp chose
    print(f"llama.cpp q8_0: {sum(g == 0 for g in behind)}/{len(behind)} tokens the fp32 model's best, "
          f"the others at most {max(behind):.3f} nats behind it")
    assert sum(g == 0 for g in behind) / len(behind) >= 0.95 and max(behind) < 0.5


def test_llama_cpp_decodes_the_tiny_f32_file_as_torch_does_and_chat_takes_it(tiny_model_dir, tmp_path, repo_python):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.model.llamacpp import LlamaCpp

    path = tmp_path / "tiny.gguf"
    export_gguf(str(tiny_model_dir), str(path), "f32")
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    runner = LlamaCpp(path, threads=1)
    compared = 0
    try:
        for prompt in PROMPTS:
            ids = tok(prompt).input_ids
            _, new = runner.generate(prompt, 12)
            assert runner.last["prompt_tokens"] == len(ids)  # llama.cpp's tokenizer splits as the model's
            with torch.no_grad():
                logp = torch.log_softmax(source(torch.tensor([ids + new])).logits[0, len(ids) - 1:], -1)
            picked = logp[torch.arange(len(new)), torch.tensor(new, dtype=torch.long)]
            compared += len(new)
            behind = logp[:-1].max(-1).values - picked
            assert not len(new) or float(behind.max()) < 1e-3, (prompt, behind)  # torch's greedy pick each time
            if len(new) < 12:  # llama.cpp stopped: torch's next pick ends a turn (a special token)
                assert int(logp[-1].argmax()) in tok.all_special_ids or \
                    tok.convert_ids_to_tokens(int(logp[-1].argmax())) in tok.get_added_vocab(), (prompt, new)
    finally:
        runner.close()
    print("tokens compared:", compared)
    assert compared >= 12

    for bad in (tmp_path / "missing.gguf", tiny_model_dir / "config.json"):  # no file; a file that is not GGUF
        refused = repo_python("-m", "lmflow_ray", "chat", "--gguf", str(bad), input="Hello\n")
        assert refused.returncode == 2 and str(bad) in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    chat = repo_python("-m", "lmflow_ray", "chat", "--gguf", str(path), "--max_new_tokens", "6", input="Hello, how are you?\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.startswith("Bot: ") and len(chat.stdout.strip()) > len("Bot:")
