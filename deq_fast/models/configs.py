"""Named model configurations and the training defaults that go with them.

``mdeq-tiny`` and ``mdeq-large`` follow the CIFAR-10 reference sizes of locuslab/deq
(docs/contracts.md#mdeq-reference-configurations:
GroupNorm 8 groups, expansion 5, weight norm, one block per branch, Broyden forward and backward
with relative stopping at 18 / 20 iterations, Adam 1e-3 with a cosine schedule, warm-up of
unrolled weight-tied layers). ``mdeq-digits`` is sized for the embedded 8x8 digits so that the
default job finishes in a few minutes on a 2-core CPU. ``deq-lm-small`` is a byte-level DEQ
transformer for the embedded CPython documentation text.

The small configurations default to one CPU thread: their convolutions and matmuls are too small
to gain from a second thread, and on a shared machine OpenMP threads that wait on each other
cost far more than they give (measured: an mdeq-digits step took 0.14 s with one thread and
0.2-2.8 s with two while other jobs ran).

``arch`` is what the checkpoint must match; ``train`` are defaults of command-line options (any
of them can be overridden on the command line).
"""
from __future__ import annotations

from typing import Any

__all__ = ["MODEL_CONFIGS", "get_config"]

_MDEQ_SOLVER = dict(f_solver="broyden", f_max_iter=18, f_tol=1e-3, f_stop_mode="rel",
                    b_solver="broyden", b_max_iter=20, b_tol=1e-6, b_stop_mode="rel",
                    ift=True, grad=1)

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "mdeq-digits": dict(
        kind="mdeq",
        arch=dict(channels=(16, 32), head_channels=(16, 32), final_channels=64, num_groups=4,
                  expansion=2, dropout=0.1, num_unrolled=6),
        train=dict(data="digits", epochs=30, batch_size=32, lr=2e-3, weight_decay=0.0,
                   pretrain_steps=135, num_threads=1, f_solver="anderson", f_max_iter=12, f_tol=1e-3,
                   f_stop_mode="rel", b_solver="anderson", b_max_iter=12, b_tol=1e-4,
                   b_stop_mode="rel", ift=True, grad=1),
    ),
    "mdeq-tiny": dict(
        kind="mdeq",
        arch=dict(channels=(24, 24), head_channels=(8, 16), final_channels=200, num_groups=8,
                  expansion=5, dropout=0.25, num_unrolled=10),
        train=dict(data="cifar10", epochs=50, batch_size=128, lr=1e-3, weight_decay=0.0,
                   pretrain_steps=3000, **_MDEQ_SOLVER),
    ),
    "mdeq-large": dict(
        kind="mdeq",
        arch=dict(channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112),
                  final_channels=1680, num_groups=8, expansion=5, dropout=0.3, num_unrolled=10),
        train=dict(data="cifar10", epochs=220, batch_size=128, lr=1e-3, weight_decay=0.0,
                   pretrain_steps=8000, **_MDEQ_SOLVER),
    ),
    "deq-lm-small": dict(
        kind="lm",
        arch=dict(d_model=128, n_heads=4, d_ff=512, max_len=128, dropout=0.05, num_unrolled=6),
        train=dict(data="pydoc", epochs=6, batch_size=16, lr=2e-3, weight_decay=0.0,
                   seq_len=64, steps_per_epoch=100, pretrain_steps=100, num_threads=1,
                   f_solver="anderson", f_max_iter=8, f_tol=1e-3, f_stop_mode="rel",
                   b_solver="anderson", b_max_iter=8, b_tol=1e-4, b_stop_mode="rel",
                   ift=True, grad=1),
    ),
}


def get_config(name: str) -> dict[str, Any]:
    """The configuration ``name`` (a copy); ValueError naming the known ones otherwise.

    Example:
        >>> get_config("mdeq-tiny")["arch"]["channels"]
        (24, 24)
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_CONFIGS)}")
    cfg = MODEL_CONFIGS[name]
    return {"kind": cfg["kind"], "arch": dict(cfg["arch"]), "train": dict(cfg["train"])}
