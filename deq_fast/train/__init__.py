"""Training and evaluation of DEQ models: ``deq-fast train`` / ``python -m deq_fast.train``.

The top layer of the package: it uses the models and data sets below it and nothing above it.
Needs the ``train`` extra (``pip install "deq_fast[train]"``: scikit-learn for the embedded
digits, matplotlib for the plots).

With no arguments ``deq-fast train`` trains ``mdeq-digits`` on the handwritten digits that ship
with scikit-learn (a held-out fifth of each class is the test set) and writes to
``runs/<model>-<timestamp>`` (files: :mod:`deq_fast.train.loop`) and ends with a summary (best
and final result, wall time, the files). ``--resume DIR`` continues exactly where the checkpoint
stopped; options that define the run must match the checkpoint (a mismatch is refused with the
difference named); a finished run says so and how to extend it. ``--out`` refuses a directory that
already holds a run. Ctrl-C before the first checkpoint leaves a directory that the same command
reuses and ``--resume`` starts again from its ``config.json``. When ``deq_fast._C`` is missing, the
run says so at its start. Multi-process: ``torchrun --nproc_per_node=N -m deq_fast.train ...``
(DistributedDataParallel, gloo on CPU, NCCL on GPU; ``--batch_size`` is the global batch).
Solver and gradient options keep TorchDEQ's names (``--f_solver --f_max_iter --f_tol
--f_stop_mode --b_solver --b_max_iter --b_tol --b_stop_mode --ift --grad --jac_loss_weight``);
defaults come from the model's configuration (:mod:`deq_fast.models.configs`).

Modules, each one job (each imports only modules above it in this list):

=================  =============================================================================
``config``         :class:`TrainConfig`, its resolution and resume rules, :class:`TrainingError`
``distributed``    ranks of a torchrun launch, collectives, device choice, DDP wrapper
``records``        :class:`~deq_fast.train.records.EpochStats`, solver statistics, jsonl files
``checkpoint``     checkpoint format, atomic save, checked load, RNG states, run directory check
``batches``        data order per epoch and rank, augmentation, batches on the device
``build``          the ``train`` extra check, data set, model, optimizer and schedule
``evaluation``     held-out evaluation during training and of a checkpoint
``plots``          ``curves.png`` and ``residuals.png`` (matplotlib imported lazily)
``summary``        the summary printed at the end of a run
``loop``           :func:`run_training` and its :class:`~deq_fast.train.loop.Trainer`
``options``        the argument parsers of ``train`` and ``eval``
``cli``            the ``deq-fast`` console script and the commands' exit codes
=================  =============================================================================
"""
from __future__ import annotations

from deq_fast.train.cli import eval_main, train_main as main
from deq_fast.train.config import TrainConfig, TrainingError
from deq_fast.train.evaluation import evaluate_checkpoint
from deq_fast.train.loop import run_training
from deq_fast.train.options import build_parser

__all__ = ["main", "eval_main", "run_training", "evaluate_checkpoint", "build_parser",
           "TrainingError", "TrainConfig"]
