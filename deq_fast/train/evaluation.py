"""Evaluation on a held-out split: during training (each epoch, summed over ranks) and of a saved
checkpoint (``deq-fast eval``)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from deq_fast.data import DATASETS, LMData, VisionData, unigram_loss
from deq_fast.train.batches import get_batch
from deq_fast.train.build import build_run_model, check_lm_splits, load_run_data
from deq_fast.train.checkpoint import load_checkpoint
from deq_fast.train.config import TrainConfig, TrainingError
from deq_fast.train.distributed import Ranks, pick_device
from deq_fast.train.records import solve_stats

__all__ = ["evaluate", "evaluate_checkpoint", "EVAL_SPLITS"]

EVAL_SPLITS = ("test", "valid")


def _held_out_batches(data: VisionData | LMData, cfg: TrainConfig, ranks: Ranks,
                      split: str) -> list[torch.Tensor]:
    """This rank's share of the held-out split, capped at ``--eval_batches``."""
    per_rank = max(1, cfg.batch_size // ranks.world)
    if isinstance(data, VisionData):
        all_idx = torch.arange(len(data.y_test))
    else:
        all_idx = torch.arange(0, len(getattr(data, split)) - cfg.seq_len - 1, cfg.seq_len)
    batches = list(torch.split(all_idx[ranks.rank::ranks.world], per_rank))
    return batches[: cfg.eval_batches] if cfg.eval_batches else batches


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: VisionData | LMData, cfg: TrainConfig,
             device: torch.device, ranks: Ranks, unrolled: bool,
             split: str = "valid") -> dict[str, Any]:
    """Test accuracy (vision) or loss/perplexity on ``split`` (LM), summed over ranks.

    Args:
        model: the model (put back in training mode afterwards).
        data: the data set.
        cfg: the run's configuration.
        device: the model's device.
        ranks: the processes of the run (every rank must call this).
        unrolled: evaluate the unrolled warm-up model instead of the DEQ solve.
        split: the held-out split of a language corpus (vision: always the test split).

    Returns:
        ``test_loss, test_f_nfe, test_residual, test_residual_trace`` and ``test_acc`` (vision)
        or ``test_ppl`` (language).
    """
    model.eval()
    loss_sum = correct = count = nfe_sum = res_sum = n_solves = 0.0
    trace: list[float] = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg.bf16))
    for idx in _held_out_batches(data, cfg, ranks, split):
        x, y = get_batch(data, cfg, idx, device, train=False, split=split)
        with amp:
            logits, info = model(x, unrolled=unrolled)
        loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                          y.reshape(-1), reduction="sum"))
        count += y.numel()
        if isinstance(data, VisionData):
            correct += float((logits.argmax(-1) == y).sum())
        nfe, res, tr = solve_stats(info, cfg.f_stop_mode)
        if math.isfinite(nfe):
            nfe_sum += nfe
            res_sum += res
            n_solves += 1
            trace = tr
    loss_sum, correct, count, nfe_sum, res_sum, n_solves = ranks.sum(
        [loss_sum, correct, count, nfe_sum, res_sum, n_solves], device)
    out = {"test_loss": loss_sum / max(count, 1),
           "test_f_nfe": nfe_sum / n_solves if n_solves else float("nan"),
           "test_residual": res_sum / n_solves if n_solves else float("nan"),
           "test_residual_trace": trace}
    if isinstance(data, VisionData):
        out["test_acc"] = correct / max(count, 1)
    else:
        out["test_ppl"] = math.exp(min(out["test_loss"], 50.0))
    model.train()
    return out


def _split_key(key: str, split: str) -> str:
    """``key`` of :func:`evaluate`'s result named by the split it measured (``test_loss`` ->
    ``valid_loss``)."""
    return f"{split}_{key[len('test_'):]}" if key.startswith("test_") else key


def evaluate_checkpoint(path: str, overrides: dict[str, Any] | None = None,
                        split: str = "test") -> dict[str, Any]:
    """Evaluate a checkpoint on a held-out split: the test split by default.

    Training reports a language model's validation split each epoch (as ``test_loss``/
    ``test_ppl`` in ``metrics.jsonl``); ``split="valid"`` reproduces those numbers as
    ``valid_loss``/``valid_ppl``. Vision data sets have only
    a test split.

    Args:
        path: checkpoint file or run directory.
        overrides: options to change for evaluation (``data_dir``, ``device``, ``f_solver``,
            ``f_max_iter``, ``f_tol``, ``f_stop_mode``, ``batch_size``, ``bf16``, ``eval_batches``).
        split: ``"test"`` or ``"valid"`` (language models only).

    Returns:
        dict with ``split``, ``test_acc`` (vision) or ``<split>_loss``/``<split>_ppl`` and
        ``unigram_loss`` (LM: ``valid_loss`` for ``split="valid"``), ``<split>_f_nfe``,
        ``<split>_residual``, ``step``, ``epoch``, ``model``, ``data``.

    Raises:
        TrainingError: a bad ``split``, an unknown option in ``overrides``, or a checkpoint,
            data set or device that cannot be used (message names it).
    """
    if split not in EVAL_SPLITS:
        raise TrainingError(f"--split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TrainingError(f"overrides {unknown}: not options of deq-fast train")
    ckpt = load_checkpoint(path, arg="--ckpt")
    cfg = dataclasses.replace(TrainConfig.from_dict(ckpt["config"], path), **overrides)
    cfg.validate()
    if split != "test" and DATASETS[cfg.data][0] == "vision":
        raise TrainingError(f"--split {split}: {cfg.data} has no validation split (only test)")
    ranks = Ranks(single=True)
    device = pick_device(cfg.device, ranks)
    data = load_run_data(cfg)
    check_lm_splits(data, cfg, (split,))
    model = build_run_model(cfg, data, device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint weights do not fit {cfg.model}: {str(exc)[:300]}") \
            from exc
    out = evaluate(model, data, cfg, device, ranks, unrolled=ckpt["step"] <= cfg.pretrain_steps,
                   split=split)
    out.pop("test_residual_trace", None)
    out = {_split_key(k, split): v for k, v in out.items()}
    if isinstance(data, LMData):
        out["unigram_loss"] = unigram_loss(data, split)
    out.update(split=split, step=ckpt["step"], epoch=ckpt["epoch"], model=cfg.model,
               data=cfg.data)
    return out
