"""Tiny real parts for tests: a byte-level BPE tokenizer trained here, and a small random Llama."""

from __future__ import annotations

import functools
from pathlib import Path

SPECIAL = [
    "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|endoftext|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>", "<|startoftext|>",
]

CORPUS = [
    "Hello, how are you? I'm doing great. How can I help you today?",
    "You are a helpful assistant. Answer briefly and politely.",
    "The capital of France is Paris. The order number is ORD-12345.",
    "Please convert the date to ISO format: 2024-01-31. Thanks!",
    "User: Assistant: system user assistant model [INST] [/INST] <<SYS>> <</SYS>>",
] * 20


@functools.lru_cache(maxsize=None)
def _trained():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer(bos_token: str | None = "<s>", eos_token: str | None = "</s>", chat_template: str | None = None):
    """A fresh PreTrainedTokenizerFast over the trained tiny BPE, with the given special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    kwargs = {"pad_token": "<pad>"}
    if bos_token:
        kwargs["bos_token"] = bos_token
    if eos_token:
        kwargs["eos_token"] = eos_token
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained()), **kwargs)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 32, positions: int = 256):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


CHATML_FILE = Path(__file__).parent / "fixtures" / "chat_templates" / "chatml.jinja"


def save_tiny(folder, **shape):
    """A tiny Llama (``shape``: tiny_llama's layers / hidden / positions) and its ChatML tokenizer,
    saved where Ray workers can load them by path."""
    tok = tiny_tokenizer(chat_template=CHATML_FILE.read_text())
    tok.save_pretrained(folder)
    tiny_llama(len(tok), **shape).save_pretrained(folder)
    return folder
