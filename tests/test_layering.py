"""Data flows one way (DESIGN.md): a module imports only from its own layer or layers upstream."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmflow_ray"

# recipe -> data -> model -> train -> storage -> serve / eval, with the CLI on top. storage.py is
# low because data reads s3:// too; it imports nothing of ours but errors.
LAYERS = {
    "errors": 0, "credentials": 0, "config": 1, "lease": 1, "storage": 1, "embedded": 1, "ray_init": 1,
    "data": 2, "model": 3, "train": 4, "serve": 5, "eval": 5, "align": 5, "cli": 6, "demo": 6, "demo_align": 6, "__main__": 7,
}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.startswith("lmflow_ray.") else module
    assert top in LAYERS, f"lmflow_ray.{top} has no layer in tests/test_layering.py: place it"
    return LAYERS[top]


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmflow_ray"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("lmflow_ray"))


def test_no_module_imports_from_downstream():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name == "lmflow_ray.__init__":
            continue
        for target in imports(path):
            if target != "lmflow_ray" and layer_of(target) > layer_of(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong
