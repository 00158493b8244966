"""The summary printed at the end of every run (and when a finished run is resumed): epochs, wall
time, the best and final held-out result, and where the run's files are."""
from __future__ import annotations

import os
from typing import Any

from deq_fast.train.checkpoint import CKPT_NAME, CONFIG_NAME

__all__ = ["run_summary"]

RUN_FILES = {"checkpoint": (CKPT_NAME,), "config": (CONFIG_NAME,),
             "logs": ("metrics.jsonl", "steps.jsonl"), "plots": ("curves.png", "residuals.png")}


def _held_out_line(records: list[dict[str, Any]]) -> str:
    """Best and final test accuracy (classifiers) or validation loss (language models)."""
    last = records[-1]
    if "test_acc" in last:
        best = max(records, key=lambda r: r["test_acc"])
        return (f"test accuracy: final {100 * last['test_acc']:.2f}% (epoch {last['epoch']}), "
                f"best {100 * best['test_acc']:.2f}% (epoch {best['epoch']})")
    scored = [r for r in records if r.get("test_loss") is not None] or [last]
    best = min(scored, key=lambda r: r.get("test_loss") or float("inf"))

    def loss(r: dict[str, Any]) -> str:
        if r.get("test_loss") is None:
            return "not finite"
        return f"{r['test_loss']:.4f}, perplexity {r['test_ppl']:.2f}"
    return (f"validation loss: final {loss(last)} (epoch {last['epoch']}), best {loss(best)} "
            f"(epoch {best['epoch']})")


def _files_line(out_dir: str) -> str:
    """The run directory and the files it holds, by kind."""
    parts = []
    for kind, names in RUN_FILES.items():
        present = [n for n in names if os.path.isfile(os.path.join(out_dir, n))]
        if present:
            parts.append(f"{kind} {', '.join(present)}")
    return f"files in {out_dir}: " + "; ".join(parts)


def run_summary(records: list[dict[str, Any]], out_dir: str, elapsed: float,
                epochs: int) -> str:
    """The end-of-run summary, several lines.

    Args:
        records: the run's epoch records (``metrics.jsonl``).
        out_dir: the run directory.
        elapsed: wall time of the run in seconds, over all its invocations.
        epochs: the epochs the run is configured for.

    Returns:
        the summary text (no trailing newline).
    """
    done = records[-1]["epoch"] if records else 0
    lines = [f"summary: {done}/{epochs} epochs, wall time {elapsed:.1f} s",
             "  " + (_held_out_line(records) if records else "no epoch finished yet"),
             "  " + _files_line(out_dir)]
    return "\n".join(lines)
