"""The training plots a user puts in a report: titled with the run, test loss drawn, residual
traces coloured by epoch with a colour bar, the tolerances drawn, the residual kind named."""
from __future__ import annotations

import math
import os

import matplotlib
import pytest

matplotlib.use("Agg")

from deq_fast.train.config import resolve_config  # noqa: E402
from deq_fast.train.plots import draw_curves, draw_residuals, plot_run  # noqa: E402


def _records(n_epochs: int, vision: bool = True) -> list[dict]:
    """Epoch records shaped like metrics.jsonl's; epoch 1 is a warm-up (no solver residual)."""
    out = []
    for e in range(1, n_epochs + 1):
        rec = {"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.2 / e, "f_nfe": 8.0,
               "b_nfe": 6.0, "residual": None if e == 1 else 1e-2 / e,
               "b_residual": None if e == 1 else 1e-3 / e,
               "residual_trace": [] if e == 1 else [1e8] + [10.0 ** -(i + e / 10) for i in range(5)],
               "test_residual_trace": [] if e == 1 else [1e8, 0.5, 0.05, 0.004]}
        rec.update({"test_acc": 0.5 + e / 100, "train_acc": 0.4 + e / 100} if vision else
                   {"test_ppl": math.exp(2.2 / e), "unigram_loss": 3.0})
        out.append(rec)
    return out


def _horizontal_lines(ax) -> set[float]:
    return {line.get_ydata()[0] for line in ax.get_lines()
            if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2}


@pytest.mark.parametrize("stop_mode,kind", [("rel", "relative"), ("abs", "absolute")])
def test_residual_figure_has_colour_bar_tolerance_and_residual_kind(stop_mode, kind):
    cfg = resolve_config({"f_stop_mode": stop_mode, "f_tol": 2e-3, "b_tol": 3e-5})
    fig = draw_residuals(_records(30), cfg, "my-run")
    assert fig._suptitle.get_text().startswith("my-run: solver residuals")
    train_ax, eval_ax, epoch_ax = fig.axes[:3]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "epoch"
    assert bars[0].get_ylim() == (1.0, 30.0)
    for ax in (train_ax, eval_ax):
        assert ax.get_ylabel() == f"mean {kind} forward residual"
        assert 2e-3 in _horizontal_lines(ax)
        assert ax.get_yscale() == "log"
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == ["--f_tol 0.002"]                      # no 30-entry legend
    assert len(train_ax.get_lines()) == 29 + 1                  # 29 solving epochs + the tol line
    colours = {tuple(line.get_color()) for line in train_ax.get_lines()[:-1]}
    assert len(colours) == 29                                   # one colour per epoch
    assert {2e-3, 3e-5} <= _horizontal_lines(epoch_ax)
    legend = [t.get_text() for t in epoch_ax.get_legend().get_texts()]
    assert f"forward ({kind})" in legend and "backward (relative)" in legend


@pytest.mark.parametrize("vision", [True, False], ids=["vision", "language"])
def test_curves_are_titled_and_plot_the_test_loss(vision):
    model = "mdeq-digits" if vision else "deq-lm-small"
    cfg = resolve_config({"model": model})
    records = _records(4, vision)
    fig = draw_curves(records, cfg, "run-7")
    assert fig._suptitle.get_text() == f"run-7: {model} on {cfg.data}"
    loss_ax, metric_ax, nfe_ax = fig.axes
    held_out = "test" if vision else "validation"
    lines = {line.get_label(): list(line.get_ydata()) for line in loss_ax.get_lines()}
    assert lines[held_out] == pytest.approx([r["test_loss"] for r in records])
    assert lines["train"] == pytest.approx([r["train_loss"] for r in records])
    assert metric_ax.get_title() == ("accuracy" if vision else "validation perplexity")
    assert [line.get_label() for line in nfe_ax.get_lines()] == ["forward", "backward"]
    if not vision:
        assert 3.0 in _horizontal_lines(loss_ax)                # unigram baseline


def test_plot_run_writes_both_pngs_and_nothing_for_no_records(tmp_path):
    cfg = resolve_config({})
    plot_run(str(tmp_path), [], cfg)
    assert os.listdir(tmp_path) == []
    plot_run(str(tmp_path), _records(2), cfg)
    for name in ("curves.png", "residuals.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
