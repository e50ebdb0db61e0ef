"""Credentials never land in a file, a log, an error or a config Ray keeps: recipe dumps leave them
out, errors do not echo them, and through Ray (a task, Serve's pickled deployments, the vLLM
engine's runtime env) they travel as references that a process on the cluster redeems. The
dashboard / state API side is in tests/test_job_submit.py."""

import json
import pickle
import subprocess
import sys

import pytest

from conftest import REPO
from lmflow_ray.config import load_recipe, recipe_to_yaml
from lmflow_ray.credentials import Secret, redact

S3_SECRET = "s3-secret-Zq8wX1vN4r"
API_KEY = "sk-api-key-Jk29Ls03Pq"
ACCESS_ID = "access-id-Mn56Bv"


def _secret_recipe(*more):
    return load_recipe(None, [f"aws_access_key_id={ACCESS_ID}", f"aws_secret_access_key={S3_SECRET}",
                              f"api_key={API_KEY}", *more])


def test_dumps_show_no_credential_and_say_which_were_left_out():
    recipe = _secret_recipe()
    text = recipe_to_yaml(recipe) + recipe.model_dump_json() + repr(recipe) + str(recipe.model_dump())
    for value in (S3_SECRET, API_KEY, ACCESS_ID):
        assert value not in text
    assert text.startswith("# left out (credentials are never written): storage.aws_access_key_id, "
                           "storage.aws_secret_access_key, serve.api_key")
    assert recipe.storage.aws_secret_access_key.reveal() == S3_SECRET
    assert load_recipe(None, ["aws_secret_access_key="]).storage.aws_secret_access_key is None


def test_the_cli_neither_prints_nor_echoes_a_credential(tmp_path):
    shown = subprocess.run([sys.executable, "-m", "lmflow_ray", "recipe", f"api_key={API_KEY}",
                            f"aws_secret_access_key={S3_SECRET}"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and API_KEY not in shown.stdout and S3_SECRET not in shown.stdout
    recipe = tmp_path / "r.yaml"
    recipe.write_text("serve:\n  api_key: 20261201123\n")  # a number: refused without being repeated
    bad = subprocess.run([sys.executable, "-m", "lmflow_ray", "recipe", str(recipe)], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "serve.api_key: must be a string" in bad.stderr
    assert "20261201123" not in bad.stderr + bad.stdout


def test_redact_blanks_every_secret_this_process_holds():
    Secret(S3_SECRET)
    assert redact(f"denied for key {S3_SECRET} at s3://b") == "denied for key *** at s3://b"


def test_a_secret_pickles_as_a_reference_that_a_ray_task_redeems(ray_local):
    holder = {"secret_key": Secret(S3_SECRET)}
    blob = pickle.dumps(holder)
    assert S3_SECRET.encode() not in blob

    @ray_local.remote
    def use(config):
        return config["secret_key"].reveal(), repr(config["secret_key"]), json.dumps({"k": str(config["secret_key"])})

    value, shown, as_json = ray_local.get(use.remote(holder))
    assert value == S3_SECRET and S3_SECRET not in shown + as_json


def test_connect_refuses_a_ray_that_something_else_started(ray_local):
    """A Ray started before connect() (reading Ray's runtime context does it) would take the place of
    the user's --address and of the runtime env that carries no secret: a bug, said so."""
    from lmflow_ray.ray_init import connect

    with pytest.raises(RuntimeError, match="before connect"):
        connect("127.0.0.1:6379")


def test_the_vllm_app_carries_no_credential_and_serves_only_the_api(ray_local, s3_server, tmp_path):
    pytest.importorskip("vllm")
    from ray import cloudpickle

    from lmflow_ray import storage
    from lmflow_ray.serve import sources
    from lmflow_ray.serve.vllm_app import _served_app, plan_vllm_app

    s3 = {"endpoint_url": s3_server.endpoint, "access_key": s3_server.access_key, "secret_key": s3_server.secret_key}
    for team in ("teamA", "teamB"):  # the same adapter name in two places
        adapter = tmp_path / team
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "default", "team": team}))
        storage.upload(adapter, f"s3://lmflow-secrets/{team}/demo", s3)
    roots = []
    for team in ("teamA", "teamB", "teamA"):
        recipe = load_recipe(None, [
            "engine=vllm", f"endpoint_url={s3_server.endpoint}", f"aws_access_key_id={s3_server.access_key}",
            f"aws_secret_access_key={s3_server.secret_key}", f"api_key={API_KEY}",
            f"lora_adapters={{demo: s3://lmflow-secrets/{team}/demo}}", "output_model_path=s3://lmflow-secrets/staging"])
        found = sources.resolve(recipe)
        app = plan_vllm_app(recipe, found)()  # bound as `lmflow-ray serve` binds it, once connected
        blob = cloudpickle.dumps(app)  # what Serve keeps for the deployments: init args, options, the app
        for value in (s3_server.secret_key, API_KEY):
            assert value.encode() not in blob, team
        ingress = app._bound_deployment
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(ingress.ray_actor_options)
        server = ingress.init_kwargs["llm_deployments"][found.base_name]._bound_deployment
        config = server.init_args[0]
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(config.runtime_env or {})
        roots.append(config.lora_config.dynamic_lora_loading_path)
    assert roots[0] != roots[1] and roots[0] == roots[2]  # other content, other prefix; same content reused
    staged = json.loads(storage.read_bytes(storage.join(roots[1], "demo", "adapter_config.json"), s3))
    assert staged["team"] == "teamB"

    served = _served_app(recipe.serve, found)
    routes = {getattr(r, "path", None): r for r in served.router.routes}
    assert not set(routes) & {"/docs", "/redoc", "/tokenize", "/detokenize"}
    # /openapi.json is ours (the schemas the guard validates), not Ray's description of all its routes.
    assert routes["/openapi.json"].endpoint.__module__ == "lmflow_ray.serve.front"
    assert "CORSMiddleware" not in [m.cls.__name__ for m in served.user_middleware]
