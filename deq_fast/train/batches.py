"""The data order and the batches: which samples (or language-model window starts) each rank
takes in each epoch, training augmentation, and moving a batch to the device.

The order depends only on ``--seed``, the epoch and the rank, so a resumed run sees the same
batches as an uninterrupted one; augmentation draws from the global torch RNG, which checkpoints
save and restore.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deq_fast.data import LMData, VisionData, lm_windows
from deq_fast.train.config import TrainConfig
from deq_fast.train.distributed import Ranks

__all__ = ["epoch_batches", "get_batch", "steps_per_epoch"]


def steps_per_epoch(data: VisionData | LMData, cfg: TrainConfig, ranks: Ranks) -> int:
    """Training steps of one epoch (vision: one pass over this rank's share of the data)."""
    if isinstance(data, LMData):
        return cfg.steps_per_epoch
    per_rank = cfg.batch_size // ranks.world
    return math.ceil(math.ceil(len(data.y_train) / ranks.world) / per_rank)


def epoch_batches(data: VisionData | LMData, cfg: TrainConfig, epoch: int,
                  ranks: Ranks) -> list[torch.Tensor]:
    """This rank's batches of ``epoch``: sample indices (vision) or window starts (language).

    Args:
        data: the data set.
        cfg: the run's configuration (``seed``, ``batch_size``, ``seq_len``, ``steps_per_epoch``).
        epoch: 0-based epoch.
        ranks: the processes of the run.

    Returns:
        one int64 tensor per step, ``batch_size / world`` entries each (the last vision batch may
        be shorter).
    """
    per_rank = cfg.batch_size // ranks.world
    if isinstance(data, VisionData):
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(range(len(data.y_train)), num_replicas=ranks.world,
                                     rank=ranks.rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
        return list(torch.split(torch.tensor(list(sampler)), per_rank))
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    high = len(data.train) - cfg.seq_len - 1
    starts = torch.randint(0, high, (cfg.steps_per_epoch, ranks.world, per_rank), generator=g)
    return list(starts[:, ranks.rank])


def _augment(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and optional horizontal flip.

    Draws from the global torch RNG, which checkpoints save and restore.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (b, 2))
    out = torch.stack([padded[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w]
                       for i in range(b)])
    if flip:
        mirror = torch.rand(b) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out


def _affine_augment(x: torch.Tensor, degrees: float, scale: float, shift_px: float) -> torch.Tensor:
    """Random rotation (+-``degrees``), zoom (1 +- ``scale``) and translation (+- ``shift_px``
    pixels) per image, bilinear, edges replicated (the digits' border is background)."""
    b, _, h, w = x.shape
    ang = (torch.rand(b) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(b) * 2 - 1) * scale
    shift = (torch.rand(b, 2) * 2 - 1) * shift_px * 2 / torch.tensor([w, h])
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def get_batch(data: VisionData | LMData, cfg: TrainConfig, idx: torch.Tensor,
              device: torch.device, train: bool,
              split: str = "valid") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the training split, or of the held-out ``split`` of a language corpus (vision
    data sets have one held-out split, the test split).

    Args:
        data: the data set.
        cfg: the run's configuration (``augment``, ``seq_len``).
        idx: sample indices (vision) or window starts (language), as from :func:`epoch_batches`.
        device: where the batch goes.
        train: training split (augmented if ``--augment``) or held-out split.
        split: the held-out split of a language corpus, ``valid`` or ``test``.

    Returns:
        ``(x, y)``: images ``(B, C, H, W)`` and labels ``(B,)``, or tokens and next tokens
        ``(B, seq_len)``.
    """
    if isinstance(data, VisionData):
        x = data.x_train[idx] if train else data.x_test[idx]
        y = data.y_train[idx] if train else data.y_test[idx]
        x = data.transform(x)
        if train and cfg.augment:
            # digits: small rotations, zooms and shifts (a mirrored digit is another symbol);
            # CIFAR-10: the standard 4-pixel crop and horizontal flip
            x = (_affine_augment(x, 12.0, 0.1, 1.0) if data.name == "digits"
                 else _augment(x, 4, True))
        return x.to(device), y.to(device)
    tokens = data.train if train else getattr(data, split)
    x, y = lm_windows(tokens, idx, cfg.seq_len)
    return x.to(device), y.to(device)
