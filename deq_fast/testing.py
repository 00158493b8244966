"""Helpers shared by the test suite and the self-test (``python -m deq_fast.selftest``).

It ships with the package because the self-test runs on a user's GPU machine without the tests
folder. Holds the per-dtype tolerance tables (one per kind of comparison; a table is never loosened
to serve another), seeded random inputs, NaN-filled outputs, the kernel-vs-reference error
measure, and the random fixed-point problems several test files solve.

Example:
    >>> r = Draws("case", 3)
    >>> out = nan_empty((2, 4), torch.float32)             # an element left unwritten stays NaN
    >>> _ = out.copy_(r.randn((2, 4), torch.float32))
    >>> max_err(out, out.clone()), KERNEL_TOL[torch.float32]
    (0.0, 3e-06)
"""
from __future__ import annotations

import zlib
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deq_fast.ops.dtypes import acc_dtype

__all__ = ["NAN", "DTYPE_IDS", "KERNEL_TOL", "LSTSQ_TOL", "DEQ_GRAD_TOL", "BACKWARD_TOL", "acc_dtype",
           "Draws", "nan_empty", "compare", "max_err", "contraction", "linear_problem", "OpNames"]

NAN = float("nan")

# readable parametrize ids
DTYPE_IDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
             torch.bfloat16: "bf16"}

# Triton kernels against their torch references: max |kernel - reference| / max(max |reference|, 1).
# bf16: Triton's interpreter converts float32 -> bfloat16 by truncation where torch (and the GPU)
# round to nearest, so an element may differ by one bf16 ulp (2^-7 relative); the mix then carries
# it over a few terms. Its keys are the state dtypes, in the order the tests list them.
KERNEL_TOL = {torch.float64: 1e-12, torch.float32: 3e-6, torch.float16: 4e-3, torch.bfloat16: 4e-2}

# the Anderson least-squares solve against the float64 dense solve (torch.testing.assert_close)
LSTSQ_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-11)}

# DEQ gradients against the dense (I - J)^{-T} reference: max relative error
DEQ_GRAD_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}

# the implicit backward: (tolerance the solve runs to, bound on its error against the dense
# solution); the problems have condition number ~10
BACKWARD_TOL = {torch.float64: (1e-11, 1e-8), torch.float32: (1e-6, 1e-4)}


class Draws:
    """Random inputs for one test case: a CPU generator seeded by the case's ``key`` (so a case draws
    the same numbers whatever runs before it), tensors moved to ``device``.

    Example:
        >>> Draws("anderson", 3, 37).randn((3, 37), torch.float16).dtype
        torch.float16
    """

    def __init__(self, *key, device: str | torch.device = "cpu"):
        self.device = device
        self.gen = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))

    def randn(self, shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        """Standard normal ``* scale``, drawn in float64 and rounded to ``dtype``."""
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        return t.to(dtype).to(self.device)

    def flags(self, B: int) -> torch.Tensor:
        """``(B,)`` bool, each True with probability 0.6."""
        return (torch.rand(B, generator=self.gen) < 0.6).to(self.device)


def nan_empty(shape, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
    """``torch.empty`` filled with NaN: an output element a kernel forgets to write stays NaN and
    fails the comparison (for bool or integer dtypes, use ``torch.full`` with a sentinel)."""
    return torch.full(shape, NAN, dtype=dtype, device=device)


def compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max |actual - expected|, max(max |expected|, 1))`` over the finite reference entries.

    The error is inf when the shapes, the NaN patterns or the non-finite entries differ (an output
    left unwritten, or a NaN the reference lacks); bool tensors compare exactly.
    """
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.shape != e.shape:
        return float("inf"), 1.0
    if a.dtype == torch.bool or e.dtype == torch.bool:
        return (0.0 if torch.equal(a, e) else float("inf")), 1.0
    a, e = a.double(), e.double()
    fin = torch.isfinite(e)
    if not torch.equal(torch.isnan(a), torch.isnan(e)) or \
            not torch.equal(a[~fin].nan_to_num(), e[~fin].nan_to_num()):
        return float("inf"), 1.0
    if not fin.any():
        return 0.0, 1.0
    return (a[fin] - e[fin]).abs().max().item(), max(e[fin].abs().max().item(), 1.0)


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The error :data:`KERNEL_TOL` bounds: max |actual - expected| / max(max |expected|, 1) (see
    :func:`compare`)."""
    err, scale = compare(actual, expected)
    return err / scale


def contraction(shape, radius: float = 0.8, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A random contraction ``f(z) = tanh(W z + b)`` on the flattened ``(B, D)`` state, float32.

    ``W`` is ``D x D`` Gaussian scaled by ``radius / sqrt(D)`` (spectral radius about ``radius``),
    ``b`` is ``(B, D)``; fresh per ``seed``. ``f`` returns the shape it is given.

    Example:
        >>> f = contraction((2, 3, 4)); f(torch.zeros(2, 3, 4)).shape
        torch.Size([2, 3, 4])
    """
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    D = int(torch.tensor(shape[1:]).prod()) if len(shape) >= 2 else 1
    W = torch.randn(D, D, generator=g) / D ** 0.5 * radius
    b = torch.randn(B, D, generator=g)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z.reshape(B, D) @ W.T + b).reshape(z.shape)
    return f


def linear_problem(B: int, D: int, radius: float = 0.6, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> tuple[Callable, torch.Tensor]:
    """``f(z) = z A^T + c`` per sample with ``||A||_2 = radius`` (a scaled orthogonal matrix), and its
    exact fixed point ``z*`` ``(B, D)`` in float64.

    Example:
        >>> f, z_star = linear_problem(2, 5)
        >>> torch.allclose(f(z_star), z_star)
        True
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    A = (radius * Q).to(dtype)
    c = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    z_star = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - Q * radius, c.double().T).T
    return (lambda z: z @ A.T + c), z_star


class OpNames(TorchDispatchMode):
    """Records the qualified name (``namespace::op``) of every op dispatched while active.

    Example:
        >>> with OpNames() as seen:
        ...     _ = torch.ones(2) + 1
        >>> "aten::add.Tensor" in seen.names
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))
