"""The entry points: the ``deq-fast`` console script (:func:`main`: ``deq-fast train [options]``
and ``deq-fast eval --ckpt ...``), and the two commands with their exit codes.

``deq-fast`` alone prints the usage; options without a sub-command go to ``train``. Exit codes:
0 done, 2 bad options, data or checkpoint (the message names it), 3 a non-finite loss stopped the
run, 130 interrupted (the last checkpoint is intact).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from deq_fast.train.checkpoint import (
    CKPT_NAME,
    CONFIG_NAME,
    check_out_dir,
    load_checkpoint,
    read_run_config,
)
from deq_fast.train.config import NonFiniteLoss, TrainConfig, TrainingError, resolve_config, resume_config
from deq_fast.train.distributed import Ranks, shutdown
from deq_fast.train.evaluation import evaluate_checkpoint
from deq_fast.train.loop import run_training
from deq_fast.train.options import build_eval_parser, build_parser
from deq_fast.train.records import finite_or_none
from deq_fast.train.summary import run_summary

__all__ = ["main", "train_main", "eval_main"]

_USAGE = """usage: deq-fast {train,eval} [options]

  train   train a DEQ model (no options: MDEQ on the embedded digits); see deq-fast train --help
  eval    evaluate a checkpoint on its test split: deq-fast eval --ckpt RUN_DIR_OR_FILE
"""


def main(argv: list[str] | None = None) -> int:
    """The ``deq-fast`` console script: dispatch to :func:`train_main` or :func:`eval_main`.

    Args:
        argv: the arguments after ``deq-fast`` (default ``sys.argv[1:]``).

    Returns:
        the exit code.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[:1] in (["-h"], ["--help"]):
        print(_USAGE)
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "train"
    if command == "train":
        return train_main(argv)
    if command == "eval":
        return eval_main(argv)
    print(f"deq-fast: unknown command {command!r}\n{_USAGE}", file=sys.stderr)
    return 2


def _run_config(explicit: dict[str, Any]) -> tuple[TrainConfig, str, dict[str, Any] | None]:
    """Configuration, output directory and loaded checkpoint (or None) of a ``train`` command.

    ``--out`` defaults to ``runs/<model>-<timestamp>``, or to the resumed run's directory;
    continuing a run elsewhere must not overwrite another run there. ``--resume`` of a run
    directory without a checkpoint (interrupted before its first one) starts that run again from
    its ``config.json``.
    """
    if "resume" not in explicit:
        cfg = resolve_config(explicit)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cfg, explicit.get("out", os.path.join("runs", f"{cfg.model}-{stamp}")), None
    where = explicit["resume"]
    unstarted = read_run_config(where)
    if unstarted is not None:
        if Ranks().main:
            print(f"note: {where} has no checkpoint yet (interrupted before the first one); "
                  f"starting that run from the beginning with its {CONFIG_NAME}", flush=True)
        return resume_config(unstarted, explicit, where), explicit.get("out", where), None
    resume = load_checkpoint(where)
    cfg = resume_config(resume["config"], explicit, where)
    default_out = where if os.path.isdir(where) else os.path.dirname(os.path.abspath(where))
    out_dir = explicit.get("out", default_out)
    if os.path.realpath(out_dir) != os.path.realpath(default_out):
        check_out_dir(out_dir)
    return cfg, out_dir, resume


def _interrupted_note(out_dir: str | None, explicit: dict[str, Any]) -> str:
    """What Ctrl-C left behind, and how to continue."""
    if out_dir is not None and os.path.isfile(os.path.join(out_dir, CKPT_NAME)):
        return f"the last checkpoint is intact: continue with --resume {out_dir}"
    if out_dir is not None and os.path.isfile(os.path.join(out_dir, CONFIG_NAME)):
        return (f"no checkpoint was written yet to {out_dir}: start the run again with "
                f"--resume {out_dir} (from the beginning, same configuration) or the same "
                "command")
    if "resume" in explicit:
        return (f"no checkpoint was written to {out_dir or 'the output directory'}; the one "
                f"resumed is unchanged: continue with --resume {explicit['resume']}")
    return "nothing was written yet: run the same command again"


def _finished(cfg: TrainConfig, out_dir: str, resume: dict[str, Any]) -> bool:
    """Whether the resumed run has already trained all its epochs; if so, say so, how to
    extend it, and print its summary."""
    if resume["epoch"] < cfg.epochs or resume["batch_in_epoch"]:
        return False
    if not Ranks().main:
        return True
    print(f"the run in {out_dir} is already finished ({resume['epoch']} of {cfg.epochs} epochs); "
          f"to train it further pass a larger --epochs, e.g. --resume {out_dir} --epochs "
          f"{resume['epoch'] + 10}")
    print(run_summary(resume["metrics"], out_dir, resume["elapsed"], cfg.epochs))
    return True


def train_main(argv: list[str] | None = None) -> int:
    """``deq-fast train`` / ``python -m deq_fast.train``.

    Args:
        argv: the options (default ``sys.argv[1:]``); see ``deq-fast train --help``.

    Returns:
        the exit code (see the module docstring); bad options exit 2 through argparse.
    """
    explicit = vars(build_parser().parse_args(argv))
    out_dir = None
    try:
        cfg, out_dir, resume = _run_config(explicit)
        if resume is None or not _finished(cfg, out_dir, resume):
            run_training(cfg, out_dir, resume=resume)
    except TrainingError as exc:
        print(f"deq-fast train: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, NonFiniteLoss) else 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; {_interrupted_note(out_dir, explicit)}", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``deq-fast eval --ckpt PATH [options]``: print the evaluation as one JSON line.

    Args:
        argv: the options (default ``sys.argv[1:]``); see ``deq-fast eval --help``.

    Returns:
        0, or 2 when the checkpoint, its data or an option cannot be used (message on stderr).
    """
    args = vars(build_eval_parser().parse_args(argv))
    path, split = args.pop("ckpt"), args.pop("split")
    try:
        out = evaluate_checkpoint(path, args, split=split)
    except TrainingError as exc:
        print(f"deq-fast eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: finite_or_none(v) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
