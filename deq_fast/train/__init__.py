"""Training and evaluation of DEQ models: ``deq-fast train`` / ``python -m deq_fast.train``.

The top layer of the package: it uses the models and data sets below it and nothing above it.
"""
from __future__ import annotations

from deq_fast.train.loop import (TrainingError, build_parser, eval_main, evaluate_checkpoint, main,
                                 run_training)

__all__ = ["main", "eval_main", "run_training", "evaluate_checkpoint", "build_parser",
           "TrainingError"]
