"""``torchdeq.utils.arg_utils``: ``add_deq_args`` with TorchDEQ's options and defaults."""
from __future__ import annotations

import argparse

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
    add("--f_max_iter", type=int, default=40, help="forward solver iteration cap (0: no solve)")
    add("--b_max_iter", type=int, default=40, help="backward solver iteration cap")
    add("--f_tol", type=float, default=1e-3, help="forward tolerance")
    add("--b_tol", type=float, default=1e-6, help="backward tolerance")
    add("--f_stop_mode", type=str, default="abs", help="forward stop mode (abs or rel)")
    add("--b_stop_mode", type=str, default="abs", help="backward stop mode (abs or rel)")
    add("--eval_factor", type=float, default=1.0, help="f_max_iter multiplier at test time")
    add("--eval_f_max_iter", type=int, default=0, help="f_max_iter at test time (overrides)")
    add("--norm_type", default="weight_norm", type=str,
        help="none, weight_norm or spectral_norm")
    add("--norm_no_scale", action="store_true", help="no learnable scale in the normalisation")
    add("--norm_clip", action="store_true", help="clip the normalisation factor")
    add("--norm_clip_value", default=1.0, type=float, help="upper bound of the factor")
    add("--norm_target_norm", default=1.0, type=float, help="target norm without learned scale")
    add("--sn_n_power_iters", default=1, type=int, help="spectral-norm power iterations")
    add("--core", default="sliced", type=str, help="indexing or sliced (or a registered core)")
    add("--ift", action="store_true", help="exact implicit gradient instead of the phantom one")
    add("--hook_ift", action="store_true", help="exact gradient through a backward hook on the output")
    add("--n_states", type=int, default=1, help="number of sampled states")
    add("--indexing", type=int, nargs="+", default=[], help="solver steps to sample")
    add("--gamma", type=float, default=0.8, help="fixed-point correction decay")
    add("--grad", type=int, nargs="+", default=[1], help="phantom gradient steps")
    add("--tau", type=float, default=1.0, help="phantom gradient damping")
    add("--sup_gap", type=int, default=-1, help="phantom trajectory sampling gap")
    add("--sup_loc", type=int, nargs="+", default=[], help="phantom trajectory sampling steps")
    add("--jac_loss_weight", type=float, default=0.0, help="Jacobian regularisation weight")
    add("--jac_loss_freq", type=float, default=0.0, help="Jacobian regularisation frequency")
    add("--jac_incremental", type=int, default=0, help="raise jac_loss_weight every N steps")
    add("--sradius_mode", action="store_true", help="monitor the spectral radius in validation")
