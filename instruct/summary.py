"""The screen a run ends with: what it gave, where its time went, and where its files are."""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from typing import Any

import torch

from instruct.eval.runner import describe
from instruct.timing import PHASES


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory in GiB, and CUDA's peak allocation where used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def time_line(split: Mapping[str, float], total: float | None) -> str:
    """``412 s: load 12.1 · prepare 3.2 · train 111.6 · ...`` in the order the run goes."""
    parts = [f"{name} {split[name]:.1f}" for name in PHASES if name in split]
    head = f"{total:.1f} s" if total is not None else "seconds"
    return f"{head}: " + " · ".join(parts) if parts else head


def end_summary(results: Mapping[str, Any], plot: str | None, wandb: str | None) -> str:
    """The lines printed when a run ends (and written to its log)."""
    rows = [
        ("best val loss", f"{results['best_val_loss']:.4f} at step {results['best_step']} "
                          f"(initial {results['initial_val_loss']:.4f}, "
                          f"{results['steps']} steps)"),
    ]  # fmt: skip
    evaluated = results.get("eval")
    for suite in (evaluated or {}).get("suites", []):
        rows.append((f"eval {suite}", describe(evaluated, suite)))
    rows.append(("time", time_line(results.get("time_split") or {}, results.get("total_seconds"))))
    memory = results.get("memory") or {}
    if memory:
        cuda = f", CUDA {memory['peak_cuda_gib']:.2f} GiB" if "peak_cuda_gib" in memory else ""
        rows.append(("peak memory", f"{memory['peak_rss_gib']:.2f} GiB resident{cuda}"))
    rows.append(("checkpoint", results.get("checkpoint") or "none (trainer.save_best=false)"))
    if plot:
        rows.append(("loss plot", plot))
    rows.append(("W&B", wandb or "off (logger=none)"))
    width = max(len(name) for name, _ in rows)
    rule = "─" * 72
    return "\n".join([rule, *(f"{name:<{width}}  {text}" for name, text in rows), rule])
