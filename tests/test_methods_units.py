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


def test_rope_scaling_linear_and_ntk_and_refusals():
    from transformers import GPT2Config, LlamaConfig

    from lmflow_ray.config import ModelSection
    from lmflow_ray.model.load import ROPE_MARK, context_length, scale_rope

    def llama():
        return LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128)  # head_dim 16

    config = llama()
    assert scale_rope(config, ModelSection(rope_pi_ratio=2.0))
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert (config.max_position_embeddings, context_length(config, 0)) == (128, 256)

    config = llama()
    scale_rope(config, ModelSection(rope_ntk_ratio=4.0))
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 4.0 ** (16 / 14))
    assert (config.max_position_embeddings, context_length(config, 0)) == (512, 512)

    # An exported config carries the mark: the same request is a no-op, another one is refused.
    saved = LlamaConfig.from_dict(config.to_dict())
    assert getattr(saved, ROPE_MARK) == {"rope_pi_ratio": 1.0, "rope_ntk_ratio": 4.0}
    assert not scale_rope(saved, ModelSection(rope_ntk_ratio=4.0))
    assert saved.rope_parameters["rope_theta"] == config.rope_parameters["rope_theta"]
    with pytest.raises(UserError, match="already scaled"):
        scale_rope(saved, ModelSection(rope_ntk_ratio=2.0))
    with pytest.raises(UserError, match="gpt2 has no rotary position embeddings"):
        scale_rope(GPT2Config(), ModelSection(rope_pi_ratio=2.0))
    assert not scale_rope(llama(), ModelSection())


def test_flash_attention_asked_for_without_it_says_so_and_uses_sdpa():
    from lmflow_ray.config import ModelSection
    from lmflow_ray.model.load import attention_implementation

    said = []
    assert attention_implementation(ModelSection(use_flash_attention=True), say=said.append) == "sdpa"
    assert len(said) == 1 and said[0].startswith("model.use_flash_attention: ") and "sdpa" in said[0]
    assert attention_implementation(ModelSection(), say=said.append) == "sdpa" and len(said) == 1


def test_vocabulary_merge_reaches_every_new_token_by_bpe():
    """A learned BPE merged into a base whose merges would split the new words differently."""
    from lmflow_ray.model.vocab import _bpe, merge_bpe

    base = {"model": {"vocab": {c: i for i, c in enumerate("abcdefg")} | {"ab": 7, "cd": 8, "bc": 9},
                      "merges": [["a", "b"], ["c", "d"], ["b", "c"]]}, "added_tokens": [{"id": 20, "content": "<s>"}]}
    learned = {"model": {"merges": [["b", "c"], ["a", "bc"], ["abc", "d"], ["é", "g"]]}}
    added = merge_bpe(base, learned)
    vocab, merges = base["model"]["vocab"], base["model"]["merges"]
    assert min(vocab[t] for t in added) == 21  # after every existing id, special tokens included
    ranks = {tuple(m): i for i, m in enumerate(merges)}
    for word in ("abc", "abcd", "ég"):  # base BPE makes ab+c and ab+cd; é was not even a token
        assert _bpe(word, ranks) == [word], word
        assert word in vocab
    assert merges[:3] == [["a", "b"], ["c", "d"], ["b", "c"]]  # the base's own merges keep their ranks


def _rope_adapter(base, folder, pi):
    """What a LoRA run with ``rope_pi_ratio=pi`` exports: the adapter, its tokenizer, its scaled base config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.config import ModelSection
    from lmflow_ray.model.load import scale_rope

    config = AutoConfig.from_pretrained(base)
    if pi != 1.0:
        assert scale_rope(config, ModelSection(rope_pi_ratio=pi))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, config=config),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(base)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    if pi != 1.0:
        model.config.save_pretrained(folder)
    return folder


def test_an_adapter_trained_with_rope_scaling_is_scored_served_and_merged_with_it(tmp_path):
    """One loader for eval, serve and merge: the base gets the adapter's RoPE scaling; vLLM refuses it."""
    from transformers import AutoModelForCausalLM

    from lmflow_ray.eval.run import ModelScorer
    from lmflow_ray.model.adapters import merge_adapter
    from lmflow_ray.model.load import load_for_inference
    from lmflow_ray.serve.engines import TransformersEngine
    from lmflow_ray.serve.sources import Sources
    from lmflow_ray.serve.vllm_app import stage_adapters
    from tiny import save_tiny

    base = save_tiny(tmp_path / "base", positions=64)
    scaled = _rope_adapter(base, tmp_path / "scaled", 4.0)
    plain = _rope_adapter(base, tmp_path / "plain", 1.0)
    native = AutoModelForCausalLM.from_pretrained(base).eval()
    x, positions = torch.zeros(1, 1, 1), torch.arange(0, 256, 4)[None]
    want, _ = native.model.rotary_emb(x, positions // 4)

    def turns_like_native(model):  # position 4k turns like native position k: 256 positions in 64
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        got, _ = inner.model.rotary_emb(x, positions)
        return torch.allclose(got, want)

    served = TransformersEngine(str(base), {"tiny:scaled": str(scaled)}, max_batch_size=2, threads=1)
    try:
        assert served.context_length == 256 and turns_like_native(served.model)
    finally:
        served.close()
    scorer = ModelScorer(str(base), str(scaled), None, 1, "text", ["nll"], 4, 2, "float32", False)
    assert scorer.model.config.rope_parameters["factor"] == 4.0 and turns_like_native(scorer.model)
    merged = merge_adapter(scaled, tmp_path / "merged")
    assert turns_like_native(AutoModelForCausalLM.from_pretrained(merged))
    ids = torch.tensor([list(range(3, 200))])
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits,
                                   scorer.model(ids).logits, atol=1e-5, rtol=1e-4)
    assert not turns_like_native(load_for_inference(str(base), {"a": str(plain)}))

    with pytest.raises(UserError, match="different RoPE scaling cannot share one base: a .*rope_pi_ratio.*b \\(none\\)"):
        load_for_inference(str(base), {"a": str(scaled), "b": str(plain)})
    found = Sources("tiny", str(base), {"tiny:scaled": str(scaled)})
    with pytest.raises(UserError, match="tiny:scaled .*trained with RoPE scaling.*lmflow-ray merge"):
        stage_adapters(load_recipe(None, []), found)


def test_training_refuses_an_adapter_as_its_base_and_takes_hub_ids(tmp_path):
    from lmflow_ray.model.locate import exact_uri, is_hub_id, model_folder
    from tiny import save_tiny

    base = save_tiny(tmp_path / "base")
    adapter = _rope_adapter(base, tmp_path / "adapter", 1.0)
    with pytest.raises(UserError, match=r"model.model_name_or_path: .*adapter.* is a LoRA adapter, not a whole model"):
        model_folder(str(adapter))
    assert model_folder(str(base)) == str(base)
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and exact_uri("gpt2", None, "k") == "gpt2"
    assert not is_hub_id(str(base)) and not is_hub_id("s3://b/m") and not is_hub_id("default")
    with pytest.raises(UserError, match="k: 'tests/no-such-model' is not a folder here"):
        exact_uri("tests/no-such-model", None, "k")  # a path under a folder that exists is no hub id
