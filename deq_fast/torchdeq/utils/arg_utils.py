"""``torchdeq.utils.arg_utils``: ``add_deq_args`` with TorchDEQ's options and defaults."""
from __future__ import annotations

import argparse

from deq_fast.nn.deq import add_common_deq_args

_SOLVERS = ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"]


def add_deq_args(parser: argparse.ArgumentParser) -> None:
    """Add TorchDEQ's command-line options, with TorchDEQ's defaults, to ``parser``.

    Defaults are TorchDEQ 0.1.0's (``--f_solver fixed_point_iter``, ``--b_solver fixed_point_iter``,
    no ``--ift``: the phantom gradient), not :func:`deq_fast.add_deq_args`'s.

    Example:
        >>> parser = argparse.ArgumentParser(); add_deq_args(parser)
        >>> args = parser.parse_args(["--f_solver", "anderson", "--f_max_iter", "0"])
    """
    add = parser.add_argument
    add("--f_solver", default="fixed_point_iter", type=str, help="forward solver")
    add("--b_solver", default="fixed_point_iter", type=str, choices=_SOLVERS,
        help="backward solver (with --ift)")
    add("--f_stop_mode", type=str, default="abs", help="forward stop mode (abs or rel)")
    add("--b_stop_mode", type=str, default="abs", help="backward stop mode (abs or rel)")
    add("--core", default="sliced", type=str, help="indexing or sliced (or a registered core)")
    add("--ift", action="store_true", help="exact implicit gradient instead of the phantom one")
    add("--hook_ift", action="store_true", help="exact gradient through a backward hook on the output")
    add_common_deq_args(parser)
