"""A run's configuration: the typed :class:`TrainConfig`, how it is resolved from the command line
and the model's defaults, what a resumed run may change, and the errors that stop a run.

Precedence: explicit options > the model's training defaults (:mod:`deq_fast.models.configs`) >
the defaults of :class:`TrainConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from deq_fast.data import DATASETS
from deq_fast.models import get_config

__all__ = ["TrainConfig", "TrainingError", "NonFiniteLoss", "resolve_config", "resume_config",
           "SOLVERS", "B_SOLVERS", "MAX_CONSECUTIVE_NONFINITE"]

SOLVERS = ("anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter")
# backward solvers: TorchDEQ's names, plus deq_fast's GMRES and its automatic choice
B_SOLVERS = SOLVERS + ("gmres", "auto")
DEFAULT_MODEL = "mdeq-digits"
DEFAULT_DEQ_IMPL = "deq_fast"
# With --nonfinite skip, stop after this many consecutive non-finite steps: the weights or the
# optimizer state are then most likely non-finite, and every later step would be skipped.
MAX_CONSECUTIVE_NONFINITE = 20
# Options a resumed run may change; every other option must match the checkpoint.
RESUMABLE_CHANGES = {"epochs", "out", "device", "num_threads", "max_steps", "ckpt_every",
                     "data_dir", "nonfinite", "progress"}
# Command-line options that are not part of the run's configuration.
_NOT_CONFIG = ("resume", "out")


class TrainingError(RuntimeError):
    """A run that cannot start or continue (message names the cause); exit code 2."""


class NonFiniteLoss(TrainingError):
    """A non-finite loss or gradient with ``--nonfinite stop``; exit code 3."""


@dataclass
class TrainConfig:
    """Every option of ``deq-fast train`` that defines or steers a run (see ``--help``).

    The fields without a default come from the model's configuration (``train`` in
    :mod:`deq_fast.models.configs`); the checkpoint stores :meth:`to_dict`.
    """

    # defaults of the model
    data: str
    epochs: int
    batch_size: int                 # global, over all processes
    lr: float
    weight_decay: float
    pretrain_steps: int             # warm-up steps with unrolled weight-tied layers
    f_solver: str
    f_max_iter: int
    f_tol: float
    f_stop_mode: str
    b_solver: str
    b_max_iter: int
    b_tol: float
    b_stop_mode: str
    ift: bool
    grad: int
    # defaults of every model
    model: str = DEFAULT_MODEL
    data_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    nonfinite: str = "skip"         # "skip" or "stop"
    jac_loss_weight: float = 0.0
    grad_clip: float = 1.0          # 0 = off
    deq_impl: str = DEFAULT_DEQ_IMPL
    num_threads: int = 0            # 0 = cores / processes
    max_steps: int = 0              # 0 = run all epochs
    ckpt_every: int = 0
    progress: bool | str = "auto"
    augment: bool = True
    label_smoothing: float = 0.0
    seq_len: int = 64
    steps_per_epoch: int = 100
    eval_batches: int = 0           # 0 = all

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> TrainConfig:
        """The configuration stored in a checkpoint (``where`` names it in errors).

        Raises:
            TrainingError: the dict has options this version does not know, or lacks some.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainingError(f"checkpoint {where} has options this version does not know: "
                                f"{unknown}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise TrainingError(f"checkpoint {where} has an incomplete configuration ({exc})") \
                from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as stored in the checkpoint and ``config.json``."""
        return dataclasses.asdict(self)

    @property
    def kind(self) -> str:
        """The model's kind: ``mdeq`` (vision) or a language model."""
        return get_config(self.model)["kind"]

    def validate(self) -> None:
        """Refuse combinations no run can use.

        Raises:
            TrainingError: model and data of different kinds, a data set on disk without
                ``--data_dir``, or a deq_fast-only backward solver with another implementation.
        """
        data_kind, needs_dir = DATASETS[self.data]
        if (self.kind == "mdeq") != (data_kind == "vision"):
            wanted = sorted(n for n, (k, _) in DATASETS.items()
                            if (k == "vision") == (self.kind == "mdeq"))
            raise TrainingError(f"--model {self.model} needs data among {wanted}, got --data "
                                f"{self.data}")
        if needs_dir and not self.data_dir:
            raise TrainingError(f"--data {self.data} reads files from disk: pass --data_dir DIR")
        if self.deq_impl != "deq_fast" and self.b_solver not in SOLVERS:
            raise TrainingError(f"--b_solver {self.b_solver} is a deq_fast backward solver; with "
                                f"--deq_impl {self.deq_impl} use one of {list(SOLVERS)}")

    def deq_kwargs(self) -> dict[str, Any]:
        """Solver and gradient options of the DEQ layer, in TorchDEQ's names."""
        out = {k: getattr(self, k) for k in ("f_solver", "f_max_iter", "f_tol", "f_stop_mode",
                                             "b_solver", "b_max_iter", "b_tol", "b_stop_mode",
                                             "ift", "grad")}
        if self.deq_impl == "deq_fast" and not self.ift:
            # deq_fast's default is the exact gradient; TorchDEQ's is not
            out["grad_mode"] = "phantom"
        return out


def resolve_config(explicit: dict[str, Any]) -> TrainConfig:
    """Full configuration: explicit options > the model's training defaults > global defaults.

    Args:
        explicit: the options given on the command line (``--resume`` and ``--out`` are ignored).

    Returns:
        the run's :class:`TrainConfig`.
    """
    model = explicit.get("model", DEFAULT_MODEL)
    values = dict(get_config(model)["train"])
    values.update({k: v for k, v in explicit.items() if k not in _NOT_CONFIG})
    values["model"] = model
    return TrainConfig(**values)


def resume_config(stored: dict[str, Any], explicit: dict[str, Any], where: str) -> TrainConfig:
    """The configuration of a resumed run: the checkpoint's, with the allowed changes applied.

    Args:
        stored: the checkpoint's ``config``.
        explicit: the options given on the command line.
        where: the checkpoint's path, for the error message.

    Returns:
        the run's :class:`TrainConfig` (``max_steps`` reset: a stop point belongs to one
        invocation, not to the run).

    Raises:
        TrainingError: an option that defines the run differs from the checkpoint's (all
            differences named).
    """
    values = dict(stored)
    values["max_steps"] = 0
    diffs = []
    for key, value in explicit.items():
        if key in _NOT_CONFIG:
            continue
        if key not in RESUMABLE_CHANGES and key in values and values[key] != value:
            diffs.append(f"--{key}: checkpoint {values[key]!r}, command line {value!r}")
        values[key] = value
    if diffs:
        raise TrainingError(f"checkpoint {where} comes from an incompatible configuration: "
                            + "; ".join(diffs) + ". Drop these options to resume, or start a new "
                            "run with --out.")
    return TrainConfig.from_dict(values, where)
