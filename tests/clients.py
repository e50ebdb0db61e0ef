"""Tools people point at a served endpoint, run as they run them: lm-evaluation-harness (the
`lm_eval` CLI, `local-completions`: token-id prompts, several to a request) over two custom tasks on
local JSONL files, `lmflow_mc` (multiple choice, scored by log-likelihood) and `lmflow_gen`
(generate_until); and schemathesis over the server's own /openapi.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TASKS = {
    "lmflow_mc": """task: lmflow_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: options
doc_to_target: gold
metric_list:
  - metric: acc
""",
    "lmflow_gen": """task: lmflow_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["{stop}"]
  max_gen_toks: {new_tokens}
metric_list:
  - metric: exact_match
""",
}


def run_lm_eval(url: str, model: str, tokenizer_dir: str | Path, folder: Path, mc: list[tuple[str, list[str], int]],
                gen: list[tuple[str, str]], new_tokens: int, stop: str, api_key: str | None = None) -> dict:
    """Both tasks in one run (or the one given): ``mc`` as (question, options, gold index), ``gen`` as
    (prompt, answer).
    Returns {"results": lm-eval's results, "mc": [option log-likelihoods per item], "gen": [answers]}."""
    tasks = folder / "tasks"
    tasks.mkdir(parents=True)
    names = [name for name, rows in [("lmflow_mc", mc), ("lmflow_gen", gen)] if rows]
    (tasks / "mc.jsonl").write_text("".join(json.dumps({"question": q, "options": o, "gold": g}) + "\n" for q, o, g in mc))
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in gen))
    for name, data in [("lmflow_mc", "mc.jsonl"), ("lmflow_gen", "gen.jsonl")]:
        (tasks / f"{name}.yaml").write_text(TASKS[name].format(data=tasks / data, new_tokens=new_tokens, stop=stop))
    out = folder / "out"
    args = [str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions", "--model_args",
            f"base_url={url}/v1/completions,model={model},tokenizer_backend=huggingface,tokenizer={tokenizer_dir},"
            "num_concurrent=1,max_retries=1", "--tasks", ",".join(names), "--include_path", str(tasks),
            "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if api_key:
        env["OPENAI_API_KEY"] = api_key  # what local-completions sends as its Bearer key
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    def samples(task: str) -> list[dict]:
        lines = next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        return sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])

    return {
        "results": json.loads(next(out.rglob("results_*.json")).read_text())["results"],
        "mc": [[float(r[0][0]) for r in s["resps"]] for s in samples("lmflow_mc")] if mc else [],  # logged as strings
        "gen": [s["filtered_resps"][0] for s in samples("lmflow_gen")] if gen else [],
    }


def run_schemathesis(base_url: str, key: str, report: Path, max_examples: int, phases: str = "coverage,fuzzing") -> dict:
    """schemathesis against the server's own /openapi.json, checking only "not a server error";
    returns its JSON report (the test cases it sent and what failed)."""
    cli = str(Path(sys.executable).parent / "schemathesis")
    cmd = [cli, "run", f"{base_url}/openapi.json", "--url", base_url, "-H", f"Authorization: Bearer {key}",
           "--checks", "not_a_server_error", "--max-examples", str(max_examples), "--seed", "7", "--workers", "1",
           "--generation-database", "none", "--request-timeout", "120", "--no-color", "--phases", phases,
           "--report", "json", "--report-json-path", str(report)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=report.parent)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return json.loads(report.read_text())
