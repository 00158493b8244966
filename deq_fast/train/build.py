"""Building a run from its configuration: the optional packages the training command needs, the
data set, the model and the optimizer with its learning-rate schedule."""
from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from deq_fast.data import LMData, VisionData, load_data
from deq_fast.models import build_model, get_config
from deq_fast.train.config import TrainConfig, TrainingError

__all__ = ["require_train_extras", "load_run_data", "check_lm_splits", "build_run_model",
           "make_optimizer", "TRAIN_EXTRAS"]

#: module imported -> distribution, of the ``train`` extra (``pip install "deq_fast[train]"``)
TRAIN_EXTRAS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def require_train_extras() -> None:
    """Check that the packages of the ``train`` extra import.

    Raises:
        TrainingError: naming the missing packages and ``pip install "deq_fast[train]"``.
    """
    missing = []
    for module, dist in TRAIN_EXTRAS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(dist)
    if missing:
        raise TrainingError(f"the training command needs {' and '.join(missing)} (the embedded "
                            "digits and the training-curve plots): pip install "
                            '"deq_fast[train]"')


def load_run_data(cfg: TrainConfig) -> VisionData | LMData:
    """The data set of ``--data`` (files from ``--data_dir``).

    Raises:
        TrainingError: a missing or malformed file, or a missing package (message names it).
    """
    try:
        return load_data(cfg.data, cfg.data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise TrainingError(str(exc)) from exc


def check_lm_splits(data: VisionData | LMData, cfg: TrainConfig, splits: tuple[str, ...]) -> None:
    """Refuse token streams too short for one ``--seq_len`` window (input plus shifted target)
    before any work: training draws window starts in ``[0, T - seq_len - 1)`` and evaluation
    steps through the same range, so a split needs ``seq_len + 2`` tokens.

    Args:
        data: the data set (vision data passes).
        cfg: the run's configuration.
        splits: the splits the run reads.

    Raises:
        TrainingError: naming the split, its file or corpus, its length and the need.
    """
    if not isinstance(data, LMData):
        return
    need = cfg.seq_len + 2
    for split in splits:
        n = len(getattr(data, split))
        if n < need:
            where = (f"file {data.files[split]}" if data.files and split in data.files
                     else f"corpus {data.name}")
            eos = " (each line end counts as one <eos> token)" if data.itos is not None else ""
            raise TrainingError(f"{split} split ({where}) has {n} tokens{eos}; --seq_len "
                                f"{cfg.seq_len} needs at least {need}: use a longer file or a "
                                "smaller --seq_len")


def build_run_model(cfg: TrainConfig, data: VisionData | LMData,
                    device: torch.device) -> torch.nn.Module:
    """The model of ``--model`` sized for ``data``, with the run's solver options, on ``device``.

    Raises:
        TrainingError: ``--seq_len`` longer than the language model's ``max_len``.
    """
    kwargs: dict[str, Any] = dict(deq_kwargs=cfg.deq_kwargs(), deq_impl=cfg.deq_impl)
    if cfg.kind == "mdeq":
        kwargs.update(num_classes=data.num_classes, in_channels=data.in_channels)
    else:
        max_len = get_config(cfg.model)["arch"]["max_len"]
        if cfg.seq_len > max_len:
            raise TrainingError(f"--seq_len {cfg.seq_len} exceeds {cfg.model}'s max_len "
                                f"{max_len}")
        kwargs.update(vocab_size=data.vocab_size)
    return build_model(cfg.model, **kwargs).to(device)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with cosine decay over the whole run (the reference schedule); a resumed run with a
    different ``--epochs`` follows the new length from its current step."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched
