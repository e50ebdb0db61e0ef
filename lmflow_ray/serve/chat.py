"""`lmflow-ray chat`: a streaming terminal chat against a served endpoint (the OpenAI API) or, with
no server, against a local model through the transformers engine."""

from __future__ import annotations

import asyncio
import sys
from typing import Callable, Iterator, TextIO

from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.serve.engines import Sampling

HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits."


def endpoint_replies(url: str, model: str | None, api_key: str | None) -> Callable[[list[dict], dict], Iterator[str]]:
    """A function: (messages, options) -> streamed text pieces, from a running server."""
    import openai

    base = url.rstrip("/")
    client = openai.OpenAI(base_url=base if base.endswith("/v1") else f"{base}/v1", api_key=api_key or "none", max_retries=0)
    try:
        names = [m.id for m in client.models.list()]
    except openai.AuthenticationError:
        raise UserError(f"{url}: the server wants an API key (--api_key or LMFLOW_RAY_API_KEY)") from None
    except openai.APIConnectionError:
        raise UserError(f"{url}: no server answers there (is `lmflow-ray serve` running?)") from None
    if model is not None and model not in names:
        raise UserError(f"--model: {model!r} is not served at {url}; served: {', '.join(names)}")
    chosen = model or names[0]

    def reply(messages: list[dict], options: dict) -> Iterator[str]:
        stream = client.chat.completions.create(model=chosen, messages=messages, stream=True, **options)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return reply


def local_replies(recipe: Recipe) -> tuple[Callable[[list[dict], dict], Iterator[str]], Callable[[], None]]:
    """The same function over a local model (or base + adapter), no server involved; and a close()."""
    from lmflow_ray.serve import sources as model_sources
    from lmflow_ray.serve.engines import TransformersEngine
    from lmflow_ray.serve.openai_api import ChatRequest

    found = model_sources.resolve(recipe)
    engine = TransformersEngine.from_recipe(recipe, found)
    adapter = next(iter(found.adapters), None)  # a LoRA run serves its adapter, not the bare base
    loop = asyncio.new_event_loop()

    def reply(messages: list[dict], options: dict) -> Iterator[str]:
        ids = engine.encode_chat(ChatRequest(model="local", messages=messages).conversation())
        room = engine.context_length - len(ids)
        if room < 1:
            raise UserError("the conversation is longer than the model's context; /reset to start over")
        sampling = Sampling(max_tokens=min(options["max_tokens"], room), temperature=options["temperature"],
                            stops=options.get("stop") or [])
        stream = engine.stream(ids, sampling, adapter)
        while True:
            try:
                piece = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            if piece.text:
                yield piece.text

    def close() -> None:
        engine.close()
        loop.close()

    return reply, close


def gguf_replies(gguf: str) -> tuple[Callable[[list[dict], dict], Iterator[str]], Callable[[], None]]:
    """The same function over a GGUF file in llama.cpp (greedy; the file's own chat template)."""
    from lmflow_ray.model.llamacpp import LlamaCpp, gguf_tokenizer, render

    tokenizer = gguf_tokenizer(gguf)
    model = LlamaCpp(gguf)

    def reply(messages: list[dict], options: dict) -> Iterator[str]:
        if options["temperature"] > 0:
            raise UserError("chat --gguf decodes greedily; leave --temperature at 0")
        stops = options.get("stop") or []
        if not stops:
            yield from model.stream(render(tokenizer, messages), options["max_tokens"])
            return
        text = "".join(model.stream(render(tokenizer, messages), options["max_tokens"]))
        for stop in stops:
            text = text.split(stop, 1)[0]
        yield text

    return reply, model.close


def run_chat(reply: Callable[[list[dict], dict], Iterator[str]], options: dict, system: str | None = None,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    interactive = stdin.isatty()
    if interactive:
        print(HELP, file=stdout)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        if interactive:
            stdout.write("You: ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            del history[int(bool(system)):]
            print("(new conversation)", file=stdout)
            continue
        history.append({"role": "user", "content": text})
        stdout.write("Bot: ")
        answer = []
        for piece in reply(history, options):
            answer.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
