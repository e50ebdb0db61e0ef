"""llama.cpp itself on a GGUF file: npm's node-llama-cpp (prebuilt CPU binaries; ``make llamacpp``
puts it in ``.venv/llamacpp``), driven through ``llamacpp.mjs`` over a pipe. Greedy decoding of
prompts that are already rendered with the model's chat template (``render``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from lmflow_ray.errors import UserError

SCRIPT = Path(__file__).with_name("llamacpp.mjs")
PACKAGE = "node-llama-cpp"


def module_dir() -> Path:
    """node-llama-cpp's install folder: LMFLOW_RAY_LLAMACPP (a folder holding node_modules), else
    the one ``make llamacpp`` fills next to this interpreter's venv."""
    home = Path(os.environ.get("LMFLOW_RAY_LLAMACPP") or Path(sys.prefix) / "llamacpp")
    return home / "node_modules" / PACKAGE


def available() -> bool:
    return shutil.which("node") is not None and (module_dir() / "package.json").is_file()


class LlamaCpp:
    """One llama.cpp model in a node process; requests are answered one after another."""

    def __init__(self, gguf: str | os.PathLike, threads: int | None = None, context: int = 2048):
        if not os.path.isfile(gguf):
            raise UserError(f"--gguf: {gguf} is not a file here")
        if shutil.which("node") is None:
            raise UserError("llama.cpp runs through node-llama-cpp, and node is not installed here")
        if not (module_dir() / "package.json").is_file():
            raise UserError(f"llama.cpp is not installed here ({module_dir()} is missing): run `make llamacpp`")
        # One core left to this process and the rest of the box: llama.cpp's threads wait by spinning,
        # and on 2 cores 2 of them decode the 135M model slower than 1 (21 against 16 ms a token).
        threads = threads or max(1, len(os.sched_getaffinity(0)) - 1)
        self.proc = subprocess.Popen(["node", str(SCRIPT), str(module_dir()), os.path.abspath(gguf), str(threads), str(context)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1)
        first = self._read()
        if not first.get("ready"):
            self.close()
            raise UserError(f"{gguf}: llama.cpp could not load it ({first.get('error', 'no answer')})")
        self.context = first["context"]

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:].strip()
            return {"error": err or f"llama.cpp exited with {self.proc.wait()}"}
        return json.loads(line)

    def stream(self, prompt: str, max_tokens: int) -> Iterator[str]:
        """New text as it is decoded (greedy); a piece is held back while it ends in half a character."""
        self.proc.stdin.write(json.dumps({"prompt": prompt, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        sent = 0
        while True:
            msg = self._read()
            if "error" in msg:
                raise UserError(f"llama.cpp: {msg['error']}")
            if "done" in msg:
                self.last = msg
                return
            text = msg["text"]
            end = len(text)
            while end > sent and text[end - 1] == "\ufffd":
                end -= 1
            if end > sent:
                yield text[sent:end]
                sent = end

    def generate(self, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
        text = "".join(self.stream(prompt, max_tokens))
        return text, self.last["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def gguf_tokenizer(gguf: str | os.PathLike) -> Any:
    """The tokenizer (and chat template) a GGUF file carries, read by transformers."""
    from transformers import AutoTokenizer

    path = Path(gguf)
    if not path.is_file():
        raise UserError(f"--gguf: {gguf} is not a file here")
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{gguf}: cannot read a tokenizer from it as GGUF ({str(err).splitlines()[0][:200]})") from None


def render(tokenizer: Any, messages: list[dict]) -> str:
    """The conversation in the model's chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
