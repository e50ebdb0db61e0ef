"""Fast checks of the method pieces: LISA's block finding and schedule, RoPE scaling arithmetic,
the method/DeepSpeed combinations refused before a cluster starts."""

import pytest
import torch

from lmflow_ray.config import load_recipe
from lmflow_ray.errors import UserError
from lmflow_ray.model.lisa import Lisa, LisaSchedule, find_blocks


def tiny(kind):
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)
    configs = {
        "llama": lambda: tf.LlamaConfig(num_hidden_layers=3, **small),
        "qwen2": lambda: tf.Qwen2Config(num_hidden_layers=3, **small),
        "mistral": lambda: tf.MistralConfig(num_hidden_layers=3, **small),
        "gemma": lambda: tf.GemmaConfig(num_hidden_layers=3, head_dim=8, **small),
        "phi": lambda: tf.PhiConfig(num_hidden_layers=3, **{k: v for k, v in small.items() if k != "num_key_value_heads"}),
        "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    }
    return tf.AutoModelForCausalLM.from_config(configs[kind]())


@pytest.mark.parametrize("kind, where", [("llama", "model.layers"), ("qwen2", "model.layers"), ("mistral", "model.layers"),
                                         ("gemma", "model.layers"), ("phi", "model.layers"), ("gpt2", "transformer.h")])
def test_lisa_finds_the_decoder_blocks_by_structure(kind, where):
    model = tiny(kind)
    name, blocks = find_blocks(model)
    assert (name, len(blocks)) == (where, 3)
    lisa = Lisa(model, activated=1, interval=5, seed=0)
    lisa.activate((1,))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith(f"{where}.1.") for n in trainable)
    assert not any(n.startswith((f"{where}.0.", f"{where}.2.")) for n in trainable)
    embed = model.get_input_embeddings().weight
    assert embed.requires_grad  # embeddings (and head) train throughout


def test_a_model_without_a_block_list_is_refused_by_name():
    with pytest.raises(UserError, match="train.use_lisa: found no list of decoder blocks in Sequential"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))


def test_lisa_schedule_is_a_function_of_seed_and_interval():
    a, b = LisaSchedule(30, 2, 20, seed=7), LisaSchedule(30, 2, 20, seed=7)
    assert [a.layers_at(s) for s in range(0, 200, 7)] == [b.layers_at(s) for s in range(0, 200, 7)]
    assert a.layers_at(0) == a.layers_at(19) and len(set(a.layers_at(0))) == 2
    assert len({a.layers_at(20 * k) for k in range(10)}) > 5  # changes with the interval
    assert len({LisaSchedule(30, 2, 20, seed=s).layers_at(0) for s in range(10)}) > 5  # and with the seed
    with pytest.raises(UserError, match="lisa_activated_layers: 7 is more than the model's 6"):
        LisaSchedule(6, 7, 20, seed=0)


@pytest.mark.parametrize("overrides, message", [
    (["use_lisa=true", "deepspeed=zero3"], "train.use_lisa: .*got 'zero3'"),
    (["use_lisa=true", "deepspeed=zero2_offload"], "train.use_lisa: .*got 'zero2_offload'"),
    (["use_qlora=true", "deepspeed=zero3"], "model.use_qlora: a quantized base cannot be partitioned by ZeRO-3"),
])
def test_unworkable_combinations_are_refused_before_training(overrides, message):
    from lmflow_ray.train.trainer import check_method

    with pytest.raises(UserError, match=message):
        check_method(load_recipe(None, overrides), 2)


def test_recipe_combinations():
    assert load_recipe(None, ["--use_qlora", "1"]).model.use_lora  # LMFlow's flag alone means LoRA on 4-bit
    assert load_recipe(None, ["use_qlora=true"]).method == "qlora"
    assert load_recipe(None, ["use_lisa=true"]).method == "lisa"
    with pytest.raises(UserError, match="use_lisa trains sampled decoder blocks in full"):
        load_recipe(None, ["use_lisa=true", "use_lora=true"])
    with pytest.raises(UserError, match="use_qlora trains LoRA adapters on a quantized base"):
        load_recipe(None, ["use_qlora=true", "use_lora=false"])
