"""The typed recipe: YAML + overrides + LMFlow flags; errors name the file, line and key."""

from pathlib import Path

import pytest

from lmflow_ray.config import FIELD_SECTION, SECTIONS, load_recipe, parse_overrides
from lmflow_ray.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_in_every_spelling(tmp_path):
    path = write(tmp_path, "model:\n  model_name_or_path: default\ndata:\n  block_size: 256\n  dataset_path: d\n")
    r = load_recipe(path, ["data.block_size=512", "--use_lora", "1", "--lora_target_modules", "q_proj,v_proj",
                           "lora_r=16", "--conversation_template=llama3"])
    assert r.data.block_size == 512
    assert r.model.use_lora is True and r.model.lora_r == 16
    assert r.model.lora_target_modules == ["q_proj", "v_proj"]
    assert r.data.conversation_template == "llama3"
    assert r.data.dataset_path == "d"


def test_lmflow_style_flat_yaml_and_hf_aliases(tmp_path):
    path = write(tmp_path, "model_name_or_path: some/model\ndataset_path: data/x\nuse_lora: true\n")
    r = load_recipe(path, ["--output_dir", "s3://bucket/run", "--model_max_length", "2048"])
    assert (r.model.model_name_or_path, r.data.dataset_path, r.model.use_lora) == ("some/model", "data/x", True)
    assert r.storage.output_model_path == "s3://bucket/run" and r.data.block_size == 2048


def test_unknown_key_names_file_line_and_the_closest_key(tmp_path):
    path = write(tmp_path, "data:\n  dataset_path: x\n  block_sise: 512\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}:3: data.block_sise: unknown key; did you mean data.block_size?"


def test_unknown_override_suggests_across_sections():
    with pytest.raises(UserError, match=r"override 'lora_rank=4': lora_rank: unknown key; did you mean model.lora_r"):
        load_recipe(None, ["lora_rank=4"])
    with pytest.raises(UserError, match="did you mean data"):
        load_recipe(None, ["dat.block_size=3"])


def test_wrong_type_names_the_key_and_line(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: fast\n")
    with pytest.raises(UserError, match=rf"^{path}:2: train.learning_rate: Input should be a valid number"):
        load_recipe(path)
    with pytest.raises(UserError, match=r"override 'block_size=4': data.block_size: Input should be greater than or equal to 8"):
        load_recipe(None, ["block_size=4"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, "data:\n  - [unclosed\n"))
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_field_names_are_unique_across_sections():
    total = sum(len(cls.model_fields) for cls in SECTIONS.values())
    assert len(FIELD_SECTION) == total  # so a flat LMFlow flag always means one thing


def test_bare_flag_means_true_and_values_are_yaml():
    assert parse_overrides(["--use_lora", "--block_size", "64", "x=[1, 2]"]) == [
        ("--use_lora", True, "--use_lora true"), ("--block_size", 64, "--block_size 64"), ("x", [1, 2], "x=[1, 2]")]


def test_cli_recipe_prints_the_merged_recipe_and_fails_cleanly(repo_python):
    ok = repo_python("-m", "lmflow_ray.cli", "recipe", "jobs/demo_lora.yaml", "--lora_r", "4")
    assert ok.returncode == 0 and "lora_r: 4" in ok.stdout
    bad = repo_python("-m", "lmflow_ray.cli", "recipe", "jobs/demo_lora.yaml", "lora_alpah=3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: override 'lora_alpah=3': lora_alpah: unknown key; did you mean model.lora_alpha?"


def test_every_shipped_recipe_loads_and_its_method_can_run(monkeypatch):
    from lmflow_ray.align.loop import check as check_align
    from lmflow_ray.train.trainer import check_method

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # recipes name files from the repository root

    recipes = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))
    assert len(recipes) >= 7
    methods, aligned = set(), set()
    for path in recipes:
        if path.name == "runtime_env.yaml":
            continue
        recipe = load_recipe(path)
        check_method(recipe, recipe.train.num_workers)
        methods.add(recipe.method)
        if recipe.align.reward_function or recipe.align.reward_model_name_or_path:
            check_align(recipe)  # the online ones: prompts, reward function, objective
            aligned.add(recipe.align.algorithm)
    assert methods == {"full", "lora", "qlora", "lisa"}
    assert aligned == {"raft", "iterative_dpo"}


@pytest.mark.parametrize("address,loopback", [
    ("127.0.0.1:6379", True), ("localhost:6379", True), ("127.0.1.1:6380", True), ("[::1]:6379", True),
    ("10.0.0.5:6379", False), ("head.svc:6379", False), ("ray://127.0.0.1:10001", False), ("auto", False),
])
def test_a_loopback_gcs_address_is_joined_from_loopback(address, loopback):
    from lmflow_ray.ray_init import on_loopback

    assert on_loopback(address) is loopback


LMFLOW_SCRIPTS = Path(__file__).parent / "fixtures" / "lmflow_scripts"


def lmflow_script_args(name: str) -> list[str]:
    """An LMFlow script's finetune.py arguments, as the shell splits them."""
    import shlex

    lines = (LMFLOW_SCRIPTS / f"{name}.args").read_text().splitlines()
    return [word for line in lines if not line.startswith("#") for word in shlex.split(line)]


@pytest.mark.parametrize("script,method", [
    ("run_finetune", "full"), ("run_finetune_with_lora", "lora"), ("run_finetune_with_qlora", "qlora"),
    ("run_finetune_with_lisa", "lisa"), ("archive_run_finetune", "full"), ("archive_run_finetune_with_lora", "lora"),
    ("archive_run_finetune_with_qlora", "qlora"), ("archive_run_finetune_with_lisa", "lisa")])
def test_lmflow_script_arguments_load_as_written_with_a_line_per_ignored_flag(script, method):
    notices: list[str] = []
    recipe = load_recipe(None, lmflow_script_args(script), notices=notices)
    assert recipe.method == method
    flags = {a.lstrip("-") for a in lmflow_script_args(script) if a.startswith("--")}
    ignored = {"do_train", "overwrite_output_dir", "ddp_timeout", "dataloader_num_workers",
               "report_to", "fp16", "optim", "deepspeed"} & flags
    assert {n.split()[0].lstrip("-") for n in notices} == ignored, notices
    if "disable_group_texts" in flags:
        assert recipe.data.packing is False  # LMFlow's group_texts off: one sample per padded row
    assert recipe.storage.run_name == dict(zip(lmflow_script_args(script), lmflow_script_args(script)[1:]))["--run_name"]


def test_lisa_step_interval_is_lmflows_readme_spelling_and_a_wrong_value_is_named():
    assert load_recipe(None, ["--use_lisa", "1", "--lisa_step_interval", "7"]).train.lisa_interval_steps == 7
    recipe = load_recipe(None, ["--validation_split_percentage", "10", "--eval_steps", "5", "--max_train_samples", "100"])
    assert (recipe.data.validation_split_percentage, recipe.train.eval_steps, recipe.data.max_train_samples) == (10, 5, 100)
    with pytest.raises(UserError, match="validation_split_percentage"):
        load_recipe(None, ["--validation_split_percentage", "100"])
    with pytest.raises(UserError, match="disable_group_texts"):
        load_recipe(None, ["--disable_group_texts", "maybe"])
    with pytest.raises(UserError, match="optim: only the AdamW family"):
        load_recipe(None, ["--optim", "adafactor"])
    assert load_recipe(None, ["--save_aggregated_lora", "1"]).storage.save_aggregated_lora is True


def test_lmflow_deepspeed_config_paths_and_word_lists():
    notices: list[str] = []
    recipe = load_recipe(None, ["--deepspeed", "configs/archive/ds_config_zero2.json", "--lora_target_modules", "q_proj",
                                "v_proj", "lora_r=4", "--use_lora", "1"], notices=notices)
    assert recipe.train.deepspeed == "zero2_offload" and recipe.model.lora_target_modules == ["q_proj", "v_proj"]
    assert notices == ["--deepspeed configs/archive/ds_config_zero2.json: not here; LMFlow's ds_config_zero2.json is the "
                       "zero2_offload preset"]
    assert load_recipe(None, ["--deepspeed", "configs/ds_config_zero3.json"]).train.deepspeed == "zero3_offload"
    assert load_recipe(None, ["--deepspeed", "configs/ds_config_zero3_nocpu.json"]).train.deepspeed == "zero3"
    with pytest.raises(UserError, match="block_size"):
        load_recipe(None, ["--block_size", "512", "1024"])
