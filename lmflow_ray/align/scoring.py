"""The scoring stage: every sampled response gets a reward, from a reward model (the Ray Data
scoring job that `lmflow-ray eval` uses) or from a Python function.

A function is named ``module:function`` (importable) or ``path/to/file.py:function``; it is
called as ``f(prompt, response)`` or, when it takes a third argument, ``f(prompt, response,
reference)``, and returns a number. Functions are cheap, so they run in the driver: nothing has to
be importable on other nodes.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
from typing import Any, Callable

from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError

KEY = "align.reward_function"


def load_function(spec: str) -> tuple[Callable[..., Any], int]:
    """The function ``spec`` names and how many arguments it takes (2 or 3)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"{KEY}: {spec!r}: expected module:function or path/to/file.py:function")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise UserError(f"{KEY}: {where}: no such file")
        loader = importlib.util.spec_from_file_location(f"lmflow_ray_reward_{abs(hash(os.path.abspath(where)))}", where)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as err:
            raise UserError(f"{KEY}: {where} failed to import: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise UserError(f"{KEY}: cannot import {where!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{KEY}: {where} has no function {name!r}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: taken as (prompt, response)
        return fn, 2
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params):
        takes = 3
    elif len(positional) == 2:
        takes = 2
    else:
        raise UserError(f"{KEY}: {spec} must take (prompt, response) or (prompt, response, reference)")
    return fn, takes


def call_function(fn: Callable[..., Any], takes: int, spec: str, prompt: str, response: str, reference: str) -> float:
    try:
        value = fn(prompt, response, reference) if takes == 3 else fn(prompt, response)
        value = float(value)
    except Exception as err:
        raise UserError(f"{KEY}: {spec} failed on a response: {type(err).__name__}: {err}") from None
    if not math.isfinite(value):
        raise UserError(f"{KEY}: {spec} returned {value} (a reward must be a finite number)")
    return value


def check_reward(recipe: Recipe) -> None:
    """Refuse a run with no reward, or a function that does not load, before any work."""
    a = recipe.align
    if not a.reward_function and not a.reward_model_name_or_path:
        raise UserError("align: no reward: set align.reward_model_name_or_path (a reward model run or folder) or "
                        "align.reward_function (module:function)")
    if a.reward_function:
        load_function(a.reward_function)


def score(recipe: Recipe, conversations: list[dict[str, Any]], prompts: list[str], responses: list[str],
          references: list[str], say: Callable[[str], None] = print) -> list[float]:
    """One reward per response: the reward function's, or the reward model's for the full
    conversation (prompt + response, rendered with the reward model's template)."""
    a = recipe.align
    if a.reward_function:
        fn, takes = load_function(a.reward_function)
        out = [call_function(fn, takes, a.reward_function, p, r, ref) for p, r, ref in zip(prompts, responses, references)]
        say(f"score: {len(out)} responses with {a.reward_function}")
        return out
    from lmflow_ray.train.rewards import score_conversations

    rm = recipe.model_copy(update={"model": recipe.model.model_copy(update={
        "model_name_or_path": a.reward_model_name_or_path, "use_lora": False, "use_qlora": False})})
    return score_conversations(rm, conversations, say)
