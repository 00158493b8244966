"""The IFT backward's Broyden solve at a client's loose ``b_tol``: deq_fast's TorchDEQ-contract
Broyden against torchdeq 0.1.0's on linear systems ``y = M y + c`` (the backward system's form,
``M = J^T``), float64.

Why this test exists: on deq-seq's real model (``deq_seq_ift.sh``: ``--b_solver broyden
--b_stop_mode rel --b_tol 1e-3 --b_max_iter 35``) the two backward solutions differ by 5.7e-5
relative while each is 3.6e-3 away from the exact (dense float64) solution, and torchdeq itself,
with its map scaled by ``1 + 2e-16``, moves by 1.2e-5. The traces agree to 1e-15 for the first
steps and the gap grows about 3x per step: rounding amplified by a slowly converging Broyden
solve, not a different formula or stop rule (both stop at the same step with the same rule).
The statement tested here: the drop-in's answer differs from the original's by no more than the
original's own sensitivity to a one-ulp change of its map (within a small factor), it stops at
the same step, and it is exactly as far from the exact solution. Contractive and non-contractive
``M`` (spectral radius 0.95 to 3), where Broyden runs 8 to 35 steps.
"""
from __future__ import annotations

import pytest
import torch
import torchdeq

import deq_fast.torchdeq as ours

DT = torch.float64
B, D = 2, 64
SOLVE = dict(max_iter=35, tol=1e-3, stop_mode="rel")          # deq_seq_ift.sh's backward options
# the drop-in's gap to the original, in units of the original's gap to itself under a one-ulp
# scaling of the map (measured: 0.1 to 1.2 on these systems, 4.7 on deq-seq's model)
FACTOR = 10.0
FLOOR = 1e-13                                                 # where both gaps are pure rounding


def _system(radius: float, seed: int):
    """``f(y) = M y + c`` per sample, ``M`` non-normal with spectral radius ``radius``."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, D, D, generator=g, dtype=DT)
    M = M * (radius / torch.linalg.eigvals(M).abs().amax(-1))[:, None, None]
    c = torch.randn(B, D, generator=g, dtype=DT)
    exact = torch.linalg.solve(torch.eye(D, dtype=DT) - M, c)
    return (lambda y: torch.einsum("bij,bj->bi", M, y) + c), exact


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("radius", [0.95, 1.1, 1.5, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_backward_broyden_differs_from_torchdeq_only_by_its_rounding_sensitivity(radius, seed):
    f, exact = _system(radius, seed)
    x0 = torch.zeros(B, D, dtype=DT)
    z_ref, _, info_ref = torchdeq.solver.get_solver("broyden")(f, x0, **SOLVE)
    z_ours, _, info_ours = ours.solver.get_solver("broyden")(f, x0.clone(), **SOLVE)
    z_ulp, _, _ = torchdeq.solver.get_solver("broyden")(lambda y: f(y) * (1 + 2e-16), x0, **SOLVE)
    assert torch.equal(info_ours["nstep"].to(DT), info_ref["nstep"].to(DT))
    torch.testing.assert_close(info_ours["rel_lowest"].to(DT), info_ref["rel_lowest"].to(DT),
                               rtol=1e-6, atol=0)
    own_sensitivity = _rel(z_ulp, z_ref)
    gap = _rel(z_ours, z_ref)
    assert gap <= FACTOR * max(own_sensitivity, FLOOR), (gap, own_sensitivity)
    # as far from the exact solution as the original: the gap is far below the solve's own error
    err_ref, err_ours = _rel(z_ref, exact), _rel(z_ours, exact)
    assert abs(err_ours - err_ref) <= 1e-6 * err_ref + FLOOR, (err_ours, err_ref)
    # negative check: a perturbation of the size the loose tolerance allows would be caught
    assert _rel(z_ref + 1e-3 * err_ref * exact, z_ref) > FACTOR * max(own_sensitivity, FLOOR)
