"""Training plots, written after every epoch: ``curves.png`` (loss, test metric, NFE per epoch)
and ``residuals.png`` (solver residual traces). matplotlib (the ``train`` extra) is imported only
when a plot is drawn."""
from __future__ import annotations

import io
import os
from typing import Any

from deq_fast.train.records import atomic_write_bytes

__all__ = ["plot_run"]


def plot_run(out_dir: str, records: list[dict[str, Any]]) -> None:
    """Write ``curves.png`` and ``residuals.png`` of the epoch records to ``out_dir``.

    Args:
        out_dir: the run directory.
        records: the ``metrics.jsonl`` records so far (nothing is drawn for none).
    """
    if not records:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name, draw in (("curves.png", _draw_curves), ("residuals.png", _draw_residuals)):
        fig = draw(plt, records)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        atomic_write_bytes(os.path.join(out_dir, name), buf.getvalue())
        plt.close(fig)


def _series(records: list[dict[str, Any]], key: str) -> list[float]:
    """One metric per epoch, NaN where it is missing (JSON null)."""
    return [r[key] if r.get(key) is not None else float("nan") for r in records]


def _draw_curves(plt, records: list[dict[str, Any]]):
    """Loss (train, validation, unigram baseline), test metric and NFE per epoch."""
    ep = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, _series(records, "train_loss"), "o-", label="train")
    if "test_acc" not in records[-1]:
        axes[0].plot(ep, _series(records, "test_loss"), "s-", label="validation")
        if records[-1].get("unigram_loss") is not None:
            axes[0].axhline(records[-1]["unigram_loss"], ls="--", c="gray", label="unigram")
        axes[1].plot(ep, _series(records, "test_ppl"), "s-")
        axes[1].set_ylabel("validation perplexity")
    else:
        axes[1].plot(ep, [100 * v for v in _series(records, "test_acc")], "s-", label="test")
        axes[1].plot(ep, [100 * v for v in _series(records, "train_acc")], "o-", label="train")
        axes[1].set_ylabel("accuracy (%)")
        axes[1].legend()
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[2].plot(ep, _series(records, "f_nfe"), "o-", label="forward NFE")
    axes[2].plot(ep, _series(records, "b_nfe"), "s-", label="backward NFE")
    axes[2].set_ylabel("evaluations per step")
    axes[2].legend()
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    return fig


def _draw_residuals(plt, records: list[dict[str, Any]]):
    """Mean residual per solver iteration of training and evaluation solves, one line per
    epoch (darker: earlier)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    cmap = plt.get_cmap("viridis")
    last_epoch = max(records[-1]["epoch"], 1)
    for r in records:
        color = cmap(r["epoch"] / last_epoch)
        for ax, key in ((axes[0], "residual_trace"), (axes[1], "test_residual_trace")):
            trace = r.get(key) or []
            # Entry 1 of an Anderson trace is a placeholder (1e8, TorchDEQ's convention, kept by
            # deq_fast); the curve starts at iteration 2.
            pts = [(i + 1, v) for i, v in enumerate(trace) if i > 0 and v is not None and v > 0]
            if pts:
                ax.semilogy(*zip(*pts), color=color, label=f"epoch {r['epoch']}")
    for ax, title in ((axes[0], "training solves"), (axes[1], "evaluation solves")):
        ax.set_title(title)
        ax.set_xlabel("solver iteration")
        ax.set_ylabel("mean residual")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles[-6:], labels[-6:], fontsize=7)
    return fig
