"""The command-line options of ``deq-fast train`` and ``deq-fast eval``: their parsers and value
checks. Every default of the train parser is ``SUPPRESS``, so the options given explicitly are
known (:func:`~deq_fast.train.config.resolve_config` fills in the rest); the help of each option
shows the default that applies, per model where the models differ (:func:`_show_defaults`)."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, TypeVar

from deq_fast.data import DATASETS
from deq_fast.models import DEQ_IMPLS, MODEL_CONFIGS
from deq_fast.train.config import (
    B_SOLVERS,
    DEFAULT_MODEL,
    MAX_CONSECUTIVE_NONFINITE,
    SOLVERS,
    TrainConfig,
    resolve_config,
)
from deq_fast.train.evaluation import EVAL_SPLITS

__all__ = ["build_parser", "build_eval_parser"]

Number = TypeVar("Number", int, float)


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _progress(text: str) -> bool | str:
    """``--progress``: ``auto`` (bars only on a terminal) or a boolean."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return _bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}") from None


def _positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    def parse(text: str) -> Number:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _nonneg(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    def parse(text: str) -> Number:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` option parser; every default is ``SUPPRESS`` so explicit options are known.

    Returns:
        the parser of ``deq-fast train``.
    """
    p = argparse.ArgumentParser(
        prog="deq-fast train", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Train a DEQ model. No arguments: MDEQ on the embedded digits.")
    _add_run_options(p.add_argument_group("run"))
    g = p.add_argument_group("language models")
    g.add_argument("--seq_len", type=_positive(int))
    g.add_argument("--steps_per_epoch", type=_positive(int))
    g.add_argument("--eval_batches", type=_nonneg(int), help="cap on evaluation batches, 0 = all")
    _add_solver_options(p.add_argument_group("solver and gradient (TorchDEQ names)"))
    _show_defaults(p)
    return p


def _default_text(name: str) -> str | None:
    """The default of config field ``name`` as help text: one value, or one per model when the
    models' training configurations differ (None: not a configuration field)."""
    if name not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return None
    per_model = {m: getattr(resolve_config({"model": m}), name) for m in MODEL_CONFIGS}
    shown = {m: "none" if v is None else str(v) for m, v in per_model.items()}
    if len(set(shown.values())) == 1:
        return f"default: {next(iter(shown.values()))}"
    return "default per --model: " + ", ".join(f"{m} {v}" for m, v in shown.items())


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append the default that applies to the help of every option that has one."""
    for action in parser._actions:
        text = _default_text(action.dest)
        if text is not None and "default" not in (action.help or ""):
            action.help = f"{action.help} ({text})" if action.help else text


def _add_run_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--model", choices=sorted(MODEL_CONFIGS), help="model configuration "
                   f"(default: {DEFAULT_MODEL})")
    g.add_argument("--data", choices=sorted(DATASETS), help="data set")
    g.add_argument("--data_dir", help="directory of the files for cifar10 / wikitext103")
    g.add_argument("--out", help="output directory (default runs/<model>-<timestamp>); a "
                   "directory that already holds a run is refused (continue it with --resume)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or its checkpoint "
                   "file); a run interrupted before its first checkpoint starts again from its "
                   "config.json (default: none, a new run)")
    g.add_argument("--epochs", type=_positive(int))
    g.add_argument("--batch_size", type=_positive(int), help="global batch size")
    g.add_argument("--lr", type=_positive(float))
    g.add_argument("--weight_decay", type=_nonneg(float))
    g.add_argument("--label_smoothing", type=_nonneg(float), help="of the training loss")
    g.add_argument("--grad_clip", type=_nonneg(float), help="max gradient norm, 0 = off")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--bf16", type=_bool, nargs="?", const=True, help="bf16 autocast for f and head")
    g.add_argument("--num_threads", type=_nonneg(int), help="CPU threads, 0 = cores / processes")
    g.add_argument("--nonfinite", choices=("skip", "stop"),
                   help="on a non-finite loss or gradient: skip the step (default; the run stops "
                   f"after {MAX_CONSECUTIVE_NONFINITE} consecutive skipped steps) or stop")
    g.add_argument("--pretrain_steps", type=_nonneg(int),
                   help="warm-up steps with unrolled weight-tied layers before the DEQ solve")
    g.add_argument("--max_steps", type=_nonneg(int), help="stop (and checkpoint) after this "
                   "global step, 0 = run all epochs")
    g.add_argument("--ckpt_every", type=_nonneg(int), help="also checkpoint every N steps")
    g.add_argument("--progress", type=_progress, nargs="?", const=True,
                   help="tqdm progress bars: auto (default: only on a terminal), true or false")
    g.add_argument("--augment", type=_bool, nargs="?", const=True,
                   help="random affine jitter (digits) / crops and flips (CIFAR-10) of training "
                   "images")
    g.add_argument("--deq_impl", choices=DEQ_IMPLS, help="DEQ implementation (torchdeq = baseline)")


def _add_solver_options(g: argparse._ArgumentGroup) -> None:
    _add_forward_solver_options(g)
    g.add_argument("--b_solver", choices=B_SOLVERS,
                   help="backward solver (gmres and auto: deq_fast only)")
    g.add_argument("--b_max_iter", type=_positive(int))
    g.add_argument("--b_tol", type=_positive(float))
    g.add_argument("--b_stop_mode", choices=("abs", "rel"))
    g.add_argument("--ift", type=_bool, nargs="?", const=True,
                   help="exact implicit gradient (true) or phantom gradient of --grad steps")
    g.add_argument("--grad", type=_positive(int), help="phantom-gradient steps when --ift false")
    g.add_argument("--jac_loss_weight", type=_nonneg(float),
                   help="weight of the Jacobian (Frobenius) regulariser")


def _add_forward_solver_options(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    g.add_argument("--f_solver", choices=SOLVERS)
    g.add_argument("--f_max_iter", type=_positive(int))
    g.add_argument("--f_tol", type=_positive(float))
    g.add_argument("--f_stop_mode", choices=("abs", "rel"))


def build_eval_parser() -> argparse.ArgumentParser:
    """The ``eval`` option parser: the checkpoint, the split, and the options evaluation may
    change (every default but ``--split``'s is ``SUPPRESS``).

    Returns:
        the parser of ``deq-fast eval``.
    """
    p = argparse.ArgumentParser(prog="deq-fast eval", allow_abbrev=False,
                                argument_default=argparse.SUPPRESS,
                                description="Evaluate a training checkpoint on its test split "
                                "(named in the output as \"split\").")
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--split", choices=EVAL_SPLITS, default="test",
                   help="held-out split: test (default) or valid (language models: the split "
                   "training reports each epoch)")
    p.add_argument("--data_dir")
    p.add_argument("--device")
    p.add_argument("--batch_size", type=_positive(int))
    p.add_argument("--bf16", type=_bool, nargs="?", const=True)
    p.add_argument("--eval_batches", type=_nonneg(int), help="cap on evaluation batches, 0 = all")
    _add_forward_solver_options(p)
    for action in p._actions:
        if action.dest not in ("help", "ckpt", "split"):
            action.help = f"{action.help} (default: the run's)" if action.help else \
                "default: the run's"
    return p
