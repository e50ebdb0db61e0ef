"""What a run shows people: metrics per logging step, TensorBoard events, loss.png, summary.md.

Model FLOPs per trained-on token follow the PaLM appendix: k * N + 12 * layers * hidden * width,
with N the parameters in matmuls, k = 6 for full fine-tuning (forward, input and weight
gradients) and k = 4 with frozen base weights (LoRA: no weight gradients for the base). Only real
tokens count, so padding shows up as lost utilisation. MFU divides by a matmul peak measured on
the worker's own device at start.
"""

from __future__ import annotations

import math
import time
from statistics import median
from pathlib import Path
from typing import Any


def flops_per_token(matmul_params: int, frozen_base: bool, layers: int, hidden: int, width: int) -> float:
    return (4 if frozen_base else 6) * matmul_params + 12 * layers * hidden * width


def measure_matmul_peak(device: Any, dtype: Any, repeats: int = 4, enough_s: float = 0.02) -> float:
    """FLOP/s of a square matmul on this device and dtype (best of a few), the MFU denominator.
    The size grows from 256 until one matmul takes ``enough_s`` (or reaches 2048 on a GPU, 1024
    on CPU), so a slow path (bf16 on a CPU without bf16 units: ~1 GFLOP/s) is timed in well under
    a second instead of 15 s."""
    import torch

    size, largest = 256, 2048 if device.type == "cuda" else 1024
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = math.inf
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - start)
        if best >= enough_s or size >= largest:
            return 2 * size**3 / best
        size *= 2


def best_peak(device: Any, dtype: Any) -> float:
    """This rank's matmul peak: the faster of fp32 and the training dtype. A CPU without bf16 units
    runs bf16 matmuls far below its fp32 rate in a square benchmark, yet a model's small autocast
    matmuls can beat that; the hardware's peak is the best it does in either."""
    import torch

    peak = measure_matmul_peak(device, dtype)
    return peak if dtype == torch.float32 else max(peak, measure_matmul_peak(device, torch.float32))


def hardware_peak(device: Any, dtype: Any) -> float:
    """The MFU denominator for the whole run: the matmul peak of the hardware the ranks train on.
    Ranks measure one after another (a rank measuring while another computes on the same cores
    reads low, and MFU over 100% follows), each with its own threads; ranks that share one
    machine's CPUs count that machine once at most: their sum is capped at its peak with all its
    cores. GPUs are each their own hardware. Every rank gets the same total."""
    import os
    import socket

    import torch
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    where = f"{socket.gethostname()}:{device}" if device.type == "cuda" else socket.gethostname()
    hosts = [where] * world
    if world > 1:
        dist.all_gather_object(hosts, where)
    first_on_host = hosts.index(where) == rank
    mine = machine = 0.0
    for turn in range(world):
        if turn == rank:
            mine = best_peak(device, dtype)
            if first_on_host and device.type != "cuda":
                threads, cores = torch.get_num_threads(), len(os.sched_getaffinity(0))
                torch.set_num_threads(cores)
                try:
                    machine = best_peak(device, dtype)
                finally:
                    torch.set_num_threads(threads)
        if world > 1:
            dist.barrier()
    found = [(where, mine, machine)] * world
    if world > 1:
        dist.all_gather_object(found, (where, mine, machine))
    return machine_totals(found)


def machine_totals(found: list[tuple[str, float, float]]) -> float:
    """Sum of (host, rank's peak, host's all-core peak or 0) over hosts, each host's ranks capped
    at its all-core peak (GPUs report none: each counts in full)."""
    per_host: dict[str, list[float]] = {}
    for host, mine, machine in found:
        entry = per_host.setdefault(host, [0.0, 0.0])
        entry[0] += mine
        entry[1] = max(entry[1], machine)
    return sum(min(total, cap) if cap else total for total, cap in per_host.values())


class Meter:
    """Accumulates the objective's sums (loss, trained tokens, ...), real tokens, FLOPs and time
    between logging steps (per rank)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = self.steps = 0
        self.flops = 0.0
        self.sums: dict[str, float] = {}

    def add(self, tally: dict[str, float], tokens: int, flops: float) -> None:
        for key, value in tally.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.tokens += tokens
        self.flops += flops

    def elapsed(self) -> float:
        return max(1e-9, time.perf_counter() - self.start)


class MemoryPeak:
    """The highest memory this worker used since the last ``take``: torch's allocator peak on a
    GPU; on CPU the process's resident size (what `top` and the OOM killer see), sampled every
    20 ms by a daemon thread. The resident size also keeps memory freed back to glibc's allocator
    until it trims; benchmarks/memory_methods.py runs workers with settings that return it."""

    def __init__(self, device: Any, every: float = 0.02) -> None:
        import threading

        self.cuda = device.type == "cuda"
        self.peak = 0
        if not self.cuda:
            import psutil

            self.process = psutil.Process()
            self.peak = self.process.memory_info().rss
            threading.Thread(target=self._sample, args=(every,), daemon=True).start()

    def _sample(self, every: float) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(every)

    def take(self) -> float:
        """Bytes at the peak since the last call; starts the next window."""
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return float(peak)
        peak, self.peak = self.peak, self.process.memory_info().rss
        return float(peak)


class BlockWatch:
    """Which decoder blocks' weights changed between two looks (a sum of squares per block), the
    direct evidence of which blocks LISA trained."""

    def __init__(self, lisa: Any) -> None:
        self.blocks = lisa.blocks
        self.last = self._sums()

    def _sums(self) -> list[float]:
        """One float64 sum of squares per block, read back in one transfer."""
        import torch

        with torch.no_grad():
            sums = [torch.stack([p.pow(2).sum(dtype=torch.float64) for p in block.parameters()]).sum()
                    for block in self.blocks]
            return torch.stack(sums).tolist()

    def changed(self) -> list[int]:
        now = self._sums()
        moved = [i for i, (a, b) in enumerate(zip(self.last, now)) if a != b]
        self.last = now
        return moved


class TensorBoard:
    """Scalars into TensorBoard event files in a local folder (copied up with each checkpoint)."""

    def __init__(self, folder: str | Path) -> None:
        from tensorboardX import SummaryWriter

        self.folder = Path(folder)
        self.writer = SummaryWriter(logdir=str(self.folder), flush_secs=5)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if key == "wall_time":  # the events carry their own
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                group, name = ("eval", key.removeprefix("eval_")) if key.startswith("eval_") else ("train", key)
                self.writer.add_scalar(f"{group}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_loss(history: list[dict[str, Any]], path: str | Path) -> None:
    """loss.png: training loss, eval loss (when the run has a held-out set) and learning rate against step."""
    fig = loss_figure(history)  # first: it picks the Agg backend before pyplot loads
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)


def loss_figure(history: list[dict[str, Any]]):
    """The figure of loss.png (laid out, not saved); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "loss" in h]
    # Preference objectives: a second panel with pairwise accuracy and the reward margin.
    acc_key = next((k for k in ("rewards/accuracies", "accuracy") if any(k in h for h in rows)), None)
    if acc_key is None:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    else:
        fig, (ax, pref) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True)
        margin_key = "rewards/margins" if acc_key == "rewards/accuracies" else "margin"
        pref.plot([h["step"] for h in rows], [h[acc_key] for h in rows], color="tab:blue", label="pairwise accuracy")
        held = [h for h in history if f"eval_{acc_key}" in h]
        if held:
            pref.plot([h["step"] for h in held], [h[f"eval_{acc_key}"] for h in held], color="tab:green", marker="o",
                      label="eval pairwise accuracy")
        pref.set_ylim(-0.05, 1.05)
        pref.set_ylabel("accuracy")
        pref.set_xlabel("step")
        pref.grid(alpha=0.3)
        margin = pref.twinx()
        margin.plot([h["step"] for h in rows], [h[margin_key] for h in rows], color="tab:purple", alpha=0.7,
                    label="reward margin")
        margin.set_ylabel("chosen - rejected reward")
        handles = pref.get_legend_handles_labels()[0] + margin.get_legend_handles_labels()[0]
        pref.legend(handles=handles, loc="lower right", frameon=False)
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], color="tab:blue", label="training loss")
    held = [h for h in history if "eval_loss" in h]
    if held:
        ax.plot([h["step"] for h in held], [h["eval_loss"] for h in held], color="tab:green", marker="o",
                label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot([h["step"] for h in rows], [h.get("learning_rate", 0) for h in rows], color="tab:orange", alpha=0.6, label="learning rate")
    lr.set_ylabel("learning rate")
    # One legend for both axes, above the plot: never over the curves, either axis or its label.
    handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(handles), frameon=False)
    fig.tight_layout()
    return fig


def _pair_lines(first: dict, last: dict, held: list[dict]) -> list[str]:
    """summary.md rows for preference objectives: pairwise accuracy and reward margin."""
    key = next((k for k in ("rewards/accuracies", "accuracy") if k in last), None)
    if key is None:
        return []
    margin = "rewards/margins" if key == "rewards/accuracies" else "margin"
    lines = [f"| pairwise accuracy | {first[key]:.1%} at step {first['step']} -> {last[key]:.1%} at step {last['step']} |",
             f"| reward margin | {first[margin]:.4f} -> {last[margin]:.4f} |"]
    if held and f"eval_{key}" in held[-1]:
        lines.append(f"| eval pairwise accuracy | {held[0][f'eval_{key}']:.1%} at step {held[0]['step']} -> "
                     f"{held[-1][f'eval_{key}']:.1%} at step {held[-1]['step']} |")
    return lines


def summary_markdown(info: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """summary.md: what ran, where it went, and how the loss moved."""
    rows = [h for h in history if "loss" in h]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    tps = [h["tokens_per_s"] for h in rows if "tokens_per_s" in h]
    mfu = [h["mfu"] for h in rows if "mfu" in h]
    mem = [h["peak_memory_mb"] for h in rows if "peak_memory_mb" in h]
    held = [h for h in history if "eval_loss" in h]
    lines = [
        f"# Run `{info['run_name']}`",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{info['model']}` |",
        f"| method | {info['method']} |",
        f"| strategy | {info['strategy']} |",
        f"| workers | {info['world_size']} ({info['device']}) |",
        f"| steps | {info['steps']} (of {info['total_steps']} planned) |",
        f"| trainable parameters | {info['trainable_params']:,} of {info['total_params']:,} |",
        f"| loss | {first.get('loss', float('nan')):.4f} at step {first.get('step', '-')} -> "
        f"{last.get('loss', float('nan')):.4f} at step {last.get('step', '-')} |",
        *([f"| eval loss | {held[0]['eval_loss']:.4f} at step {held[0]['step']} -> {held[-1]['eval_loss']:.4f} at step "
           f"{held[-1]['step']}" + (f" ({held[-1]['eval_tokens']:,} held-out tokens)" if "eval_tokens" in held[-1] else "")
           + " |"] if held else []),
        *_pair_lines(first, last, held),
        f"| tokens/s (all workers, median) | {median(tps) if tps else math.nan:,.0f} |",
        f"| MFU (median) | {median(mfu) if mfu else math.nan:.2%} |",
        f"| peak memory (highest worker) | {max(mem) if mem else math.nan:,.0f} MB |",
        f"| final export | `{info['export']}` |",
        "",
        "![loss](loss.png)",
        "",
        "| step | loss |" + (" eval loss |" if held else "") + " learning rate | grad norm | tokens/s | step time (s) |",
        "|---:|---:|" + ("---:|" if held else "") + "---:|---:|---:|---:|",
    ]
    for h in rows:
        held_loss = (f" {h['eval_loss']:.4f} |" if "eval_loss" in h else " |") if held else ""
        lines.append(f"| {h['step']} | {h['loss']:.4f} |{held_loss} {h.get('learning_rate', 0):.3g} | "
                     f"{h.get('grad_norm', float('nan')):.3f} | {h.get('tokens_per_s', 0):,.0f} | {h.get('step_time', 0):.3f} |")
    return "\n".join(lines) + "\n"

