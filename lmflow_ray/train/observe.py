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


def measure_matmul_peak(device: Any, dtype: Any, size: int = 1024, repeats: int = 4) -> float:
    """FLOP/s of a square matmul on this device and dtype (best of a few), the MFU denominator."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class Meter:
    """Accumulates tokens, loss and time between logging steps (per rank)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens = self.trained = self.steps = 0
        self.loss_sum = 0.0
        self.flops = 0.0

    def add(self, loss: float, tokens: int, trained: int, flops: float) -> None:
        self.loss_sum += loss
        self.tokens += tokens
        self.trained += trained
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
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_loss(history: list[dict[str, Any]], path: str | Path) -> None:
    """loss.png: training loss (and learning rate) against step."""
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
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([h["step"] for h in rows], [h["loss"] for h in rows], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    lr = ax.twinx()
    lr.plot([h["step"] for h in rows], [h.get("learning_rate", 0) for h in rows], color="tab:orange", alpha=0.6, label="learning rate")
    lr.set_ylabel("learning rate")
    # One legend for both axes, above the plot: never over the curves, either axis or its label.
    handles = ax.get_legend_handles_labels()[0] + lr.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(handles), frameon=False)
    fig.tight_layout()
    return fig


def summary_markdown(info: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """summary.md: what ran, where it went, and how the loss moved."""
    rows = [h for h in history if "loss" in h]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    tps = [h["tokens_per_s"] for h in rows if "tokens_per_s" in h]
    mfu = [h["mfu"] for h in rows if "mfu" in h]
    mem = [h["peak_memory_mb"] for h in rows if "peak_memory_mb" in h]
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
        f"| tokens/s (all workers, median) | {median(tps) if tps else math.nan:,.0f} |",
        f"| MFU (median) | {median(mfu) if mfu else math.nan:.2%} |",
        f"| peak memory (highest worker) | {max(mem) if mem else math.nan:,.0f} MB |",
        f"| final export | `{info['export']}` |",
        "",
        "![loss](loss.png)",
        "",
        "| step | loss | learning rate | grad norm | tokens/s | step time (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for h in rows:
        lines.append(f"| {h['step']} | {h['loss']:.4f} | {h.get('learning_rate', 0):.3g} | "
                     f"{h.get('grad_norm', float('nan')):.3f} | {h.get('tokens_per_s', 0):,.0f} | {h.get('step_time', 0):.3f} |")
    return "\n".join(lines) + "\n"

