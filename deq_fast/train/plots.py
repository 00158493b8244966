"""Training plots, written after every epoch, titled with the run: ``curves.png`` (train and test
loss, test metric, solver evaluations per epoch) and ``residuals.png`` (the forward solver's
residual per iteration, one line per epoch coloured by a colour bar, and the per-epoch forward and
backward residuals; each panel names the residual's kind and draws the tolerance). matplotlib
(the ``train`` extra) is imported only when a plot is drawn."""
from __future__ import annotations

import io
import os
from typing import Any

from deq_fast.train.config import TrainConfig
from deq_fast.train.records import atomic_write_bytes

__all__ = ["plot_run", "draw_curves", "draw_residuals", "residual_kind"]

TOL_STYLE = {"ls": "--", "c": "crimson", "lw": 1.2}


def plot_run(out_dir: str, records: list[dict[str, Any]], cfg: TrainConfig) -> None:
    """Write ``curves.png`` and ``residuals.png`` of the epoch records to ``out_dir``.

    Args:
        out_dir: the run directory (its name titles the figures).
        records: the ``metrics.jsonl`` records so far (nothing is drawn for none).
        cfg: the run's configuration (model, data, tolerances, stop modes).
    """
    if not records:
        return
    plt = _pyplot()
    run = os.path.basename(os.path.normpath(out_dir))
    for name, draw in (("curves.png", draw_curves), ("residuals.png", draw_residuals)):
        fig = draw(records, cfg, run)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        atomic_write_bytes(os.path.join(out_dir, name), buf.getvalue())
        plt.close(fig)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def residual_kind(stop_mode: str) -> str:
    """``relative`` or ``absolute``: the residual a solver with ``stop_mode`` reports."""
    return "relative" if stop_mode == "rel" else "absolute"


def _series(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    """One metric per epoch, NaN where it is missing (JSON null)."""
    return [scale * r[key] if r.get(key) is not None else float("nan") for r in records]


def _figure(plt, ncols: int, width: float, title: str):
    fig, axes = plt.subplots(1, ncols, figsize=(width, 3.9), layout="constrained")
    fig.suptitle(title)
    return fig, axes


def draw_curves(records: list[dict[str, Any]], cfg: TrainConfig, run: str):
    """Loss (train, test or validation, unigram baseline), test metric and solver evaluations
    per epoch.

    Args:
        records: the epoch records; ``cfg``: the run's configuration; ``run``: its name.

    Returns:
        the matplotlib figure.
    """
    fig, axes = _figure(_pyplot(), 3, 13.5, f"{run}: {cfg.model} on {cfg.data}")
    ep = [r["epoch"] for r in records]
    vision = "test_acc" in records[-1]
    held_out = "test" if vision else "validation"
    axes[0].plot(ep, _series(records, "train_loss"), "o-", label="train")
    axes[0].plot(ep, _series(records, "test_loss"), "s-", label=held_out)
    axes[0].set(title="loss", ylabel="cross-entropy")
    if vision:
        axes[1].plot(ep, _series(records, "test_acc", 100), "s-", label="test")
        axes[1].plot(ep, _series(records, "train_acc", 100), "o-", label="train")
        axes[1].set(title="accuracy", ylabel="accuracy (%)")
    else:
        if records[-1].get("unigram_loss") is not None:
            axes[0].axhline(records[-1]["unigram_loss"], ls=":", c="gray", label="unigram")
        axes[1].plot(ep, _series(records, "test_ppl"), "s-", label="validation")
        axes[1].set(title="validation perplexity", ylabel="perplexity")
    axes[2].plot(ep, _series(records, "f_nfe"), "o-", label="forward")
    axes[2].plot(ep, _series(records, "b_nfe"), "s-", label="backward")
    axes[2].set(title="solver evaluations per training step", ylabel="evaluations")
    for a in axes:
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(_integer_ticks())
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return fig


def draw_residuals(records: list[dict[str, Any]], cfg: TrainConfig, run: str):
    """Forward residual per solver iteration of training and evaluation solves (one line per
    epoch, coloured by epoch with a colour bar; ``--f_tol`` drawn), and the mean forward and
    backward residuals per epoch (``--f_tol`` and ``--b_tol`` drawn).

    Args:
        records: the epoch records; ``cfg``: the run's configuration; ``run``: its name.

    Returns:
        the matplotlib figure.
    """
    plt = _pyplot()
    kind = residual_kind(cfg.f_stop_mode)
    fig, axes = _figure(plt, 3, 15, f"{run}: solver residuals ({cfg.f_solver} forward, "
                                     f"{cfg.b_solver} backward)")
    last_epoch = max(records[-1]["epoch"], 1)
    norm = plt.Normalize(vmin=1, vmax=max(last_epoch, 2))
    cmap = plt.get_cmap("viridis")
    for ax, key, what in ((axes[0], "residual_trace", "training"),
                          (axes[1], "test_residual_trace", "evaluation")):
        for r in records:
            pts = _trace_points(r.get(key) or [])
            if pts:
                ax.semilogy(*zip(*pts), color=cmap(norm(r["epoch"])), lw=1.2)
        ax.axhline(cfg.f_tol, **TOL_STYLE, label=f"--f_tol {cfg.f_tol:g}")
        ax.set(title=f"forward solves in {what}", xlabel="solver iteration",
               ylabel=f"mean {kind} forward residual")
        ax.legend(fontsize=8, loc="upper right")
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[:2]),
                       label="epoch")
    bar.locator = _integer_ticks()
    bar.update_ticks()
    _draw_epoch_residuals(axes[2], records, cfg, kind)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_locator(_integer_ticks())
    return fig


def _integer_ticks():
    """Ticks on whole numbers only (epochs, solver iterations)."""
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True)


def _trace_points(trace: list[float | None]) -> list[tuple[int, float]]:
    """(iteration, residual) of a trace, skipping missing values and entry 1: an Anderson trace
    starts with a placeholder (1e8, TorchDEQ's convention, kept by deq_fast)."""
    return [(i + 1, v) for i, v in enumerate(trace) if i > 0 and v is not None and v > 0]


def _draw_epoch_residuals(ax, records: list[dict[str, Any]], cfg: TrainConfig,
                          kind: str) -> None:
    """Mean lowest forward residual and mean backward residual (relative) per epoch."""
    ep = [r["epoch"] for r in records]
    forward, backward = _series(records, "residual"), _series(records, "b_residual")
    ax.semilogy(ep, forward, "o-", c="tab:blue", label=f"forward ({kind})")
    ax.semilogy(ep, backward, "s-", c="tab:orange", label="backward (relative)")
    ax.axhline(cfg.f_tol, **TOL_STYLE, label=f"--f_tol {cfg.f_tol:g}")
    ax.axhline(cfg.b_tol, ls=":", c="crimson", lw=1.2, label=f"--b_tol {cfg.b_tol:g} ({cfg.b_stop_mode})")
    ax.set(title="residual per epoch (training)", xlabel="epoch", ylabel="mean lowest residual")
    ax.legend(fontsize=8)
