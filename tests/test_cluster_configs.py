"""The cluster configs as their tools read them, offline: every KubeRay manifest against KubeRay's
CRD schema of its kind, every `ray up` config against the cluster launcher's schema and checks,
the RayJob's runtime environment through Ray's own parser, and every `lmflow-ray` command the files
carry (the RayJob's entrypoint, the commands in their comments) through the recipe loader, so the
recipe and dataset they name are here and no credential rides on a command line."""

import functools
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from lmflow_ray.config import load_recipe

REPO = Path(__file__).resolve().parent.parent
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
LAUNCHER = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
CRDS = REPO / "cluster" / "kuberay" / "crds"
SECRET_WORDS = re.compile(r"aws_secret_access_key|aws_access_key_id|api_key|auth_token|password|RAY_AUTH_TOKEN=", re.I)


@functools.cache
def crd_schema(kind: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def test_the_cluster_folder_has_every_kind():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in KUBERAY}
    assert kinds == {"RayJob", "RayCluster", "RayService"}
    assert {p.name for p in LAUNCHER} == {"local.yaml", "aws.yaml"}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_its_crd(path):
    import jsonschema

    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest, crd_schema(manifest["kind"]))


def test_a_manifest_with_a_mistake_fails_its_crd():
    import jsonschema

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    manifest["spec"]["shutdownAfterJobFinishes"] = "yes"  # a string where KubeRay wants a boolean
    with pytest.raises(jsonschema.ValidationError, match="boolean"):
        jsonschema.validate(manifest, crd_schema("RayJob"))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_ray_ups_own_checks(path):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # what `ray up` runs before it starts a node


def test_the_rayjob_runs_the_laptop_recipe_on_gpus_and_leaves_no_cluster_behind():
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime["working_dir"] == "/app"  # the image's copy of this repository
    RuntimeEnv(**{**runtime, "working_dir": str(REPO)})  # Ray's own parser, on this checkout
    recipe = entrypoint_recipe(spec["entrypoint"])
    assert recipe.train.use_gpu is True and recipe.storage.output_model_path.startswith("s3://")
    (gpus,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert gpus["replicas"] >= recipe.train.num_workers  # one GPU worker pod per Ray Train worker
    assert gpus["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for pod in [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"], gpus["template"]]:
        (container,) = pod["spec"]["containers"]
        assert {"secretRef": {"name": "lmflow-s3"}} in container["envFrom"]  # S3 keys from a Secret
    assert not SECRET_WORDS.search(spec["entrypoint"] + spec["runtimeEnvYAML"])


def entrypoint_recipe(command: str):
    """`lmflow-ray train RECIPE OVERRIDES...` loaded as the CLI loads it; its recipe and dataset exist."""
    words = shlex.split(command)
    assert words[:2] in (["lmflow-ray", "train"], ["lmflow-ray", "align"], ["lmflow-ray", "eval"]), command
    path = REPO / words[2]
    assert path.is_file(), f"{command}: {words[2]} is not in this repository"
    recipe = load_recipe(path, words[3:])
    assert (REPO / recipe.data.dataset_path).exists(), f"{command}: {recipe.data.dataset_path} is not here"
    return recipe


def commented_commands(path: Path) -> list[str]:
    """The `lmflow-ray ...` commands in a file's comments, continuation lines joined."""
    lines = [line.lstrip("# ").rstrip() for line in path.read_text().splitlines() if line.startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    found = []
    for line in joined:
        line = line.strip()
        if line.startswith("lmflow-ray ") or " -- lmflow-ray " in line:
            found.append(line[line.index("lmflow-ray "):].split(" #")[0])
    return found


@pytest.mark.parametrize("path", KUBERAY + LAUNCHER, ids=lambda p: p.name)
def test_every_command_in_the_comments_loads_and_carries_no_credential(path):
    for command in commented_commands(path):
        entrypoint_recipe(command)
        assert not SECRET_WORDS.search(command), command
    if path.name not in ("rayservice.yaml", "rayjob.yaml"):  # a served model; the RayJob's command is its entrypoint
        assert commented_commands(path), f"{path.name} shows no lmflow-ray command"
