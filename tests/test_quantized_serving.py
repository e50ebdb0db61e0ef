"""serve.quantization on the transformers engine (int8 on CPU, bitsandbytes 4/8-bit) and what the
vLLM engine is given for it."""

import asyncio

import pytest

from test_serve import _adapter


def _weights_bytes(model):
    import torch

    seen, total = set(), 0
    for value in model.state_dict().values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def test_int8_serves_with_int8_linear_layers_and_fp32_lora(tiny_model_dir, tmp_path):
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from lmflow_ray.serve.engines import Sampling, TransformersEngine

    adapter = _adapter(tiny_model_dir, tmp_path / "support", 1)
    plain = TransformersEngine(str(tiny_model_dir), threads=1)
    int8 = TransformersEngine(str(tiny_model_dir), {"tiny:support": str(adapter)}, threads=1, quantization="int8")
    try:
        ids = int8.encode_text("Hello, how are you?")
        base = asyncio.run(int8.complete(ids, Sampling(max_tokens=8, temperature=0)))
        tuned = asyncio.run(int8.complete(ids, Sampling(max_tokens=8, temperature=0), "tiny:support"))
        modules = dict(int8.model.named_modules())
        assert isinstance(modules["base_model.model.lm_head"], DynamicInt8Linear)
        q = modules["base_model.model.model.layers.0.self_attn.q_proj"]
        assert isinstance(q.base_layer, DynamicInt8Linear) and type(q.lora_A["tiny:support"]) is torch.nn.Linear
        assert _weights_bytes(int8.model) < 0.6 * _weights_bytes(plain.model)
    finally:
        int8.close()
        plain.close()
    assert base.completion_tokens == tuned.completion_tokens == 8 and base.text != tuned.text  # the adapter acts


def test_bitsandbytes_4bit_and_8bit_load_their_layers(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tiny import save_tiny

    from lmflow_ray.serve.engines import Sampling, TransformersEngine

    folder = save_tiny(tmp_path, hidden=64)  # 4-bit blocks of 64 values: the 32-wide tiny model is too narrow
    for how, layer in [("bnb-4bit", "Linear4bit"), ("bnb-8bit", "Linear8bitLt")]:
        engine = TransformersEngine(str(folder), threads=1, quantization=how)
        try:
            out = asyncio.run(engine.complete(engine.encode_text("Hello"), Sampling(max_tokens=4, temperature=0)))
            assert type(engine.model.model.layers[0].mlp.up_proj).__name__ == layer
            assert out.completion_tokens == 4
        finally:
            engine.close()


def test_vllm_gets_bitsandbytes_and_refuses_the_cpu_methods():
    from lmflow_ray.config import load_recipe
    from lmflow_ray.errors import UserError
    from lmflow_ray.serve.vllm_app import vllm_quantization

    assert vllm_quantization(load_recipe(None, ["quantization=bnb-4bit"]).serve.quantization) == {"quantization": "bitsandbytes"}
    assert vllm_quantization(None) == {}
    with pytest.raises(UserError, match="vllm_engine_kwargs.quantization"):
        vllm_quantization("int8")
    with pytest.raises(UserError, match="quantization"):
        load_recipe(None, ["quantization=int4"])
