"""``torchdeq.dropout``: variational dropout (one mask per step), deq_fast's classes.

Fixed against TorchDEQ (see :mod:`deq_fast.nn.dropout`): masks on the input's device (torchdeq
issue #13), a mask that no longer fits is redrawn, ``dropout=1`` gives zeros instead of NaN.
"""
from deq_fast.nn.dropout import (
    VariationalDropout,
    VariationalDropout1d,
    VariationalDropout2d,
    VariationalDropout3d,
    VariationalDropToken1d,
    VariationalDropToken2d,
    VariationalDropToken3d,
    reset_dropout,
)

__all__ = ["VariationalDropout", "VariationalDropout1d", "VariationalDropout2d",
           "VariationalDropout3d", "VariationalDropToken1d", "VariationalDropToken2d",
           "VariationalDropToken3d", "reset_dropout"]
