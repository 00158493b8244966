"""get_deq against the installed torchdeq 0.1.0 (float64): options a TorchDEQ client passes mean
what they mean there — explicit ``ift=False`` (phantom gradient), ``f_max_iter=0``, ``writer=``
passed to the forward, ``name=``."""
from __future__ import annotations

import argparse

import pytest
import torch
import torchdeq
from torch import nn

import deq_fast

RTOL = 1e-5


class _Layer(nn.Module):
    """``f(z) = tanh(W z + U x + b)`` with a spectral radius well below 1."""

    def __init__(self, d: int):
        super().__init__()
        self.W = nn.Linear(d, d, dtype=torch.float64)
        self.U = nn.Linear(d, d, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / self.W.weight.norm(2).clamp(min=1))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


def _grads(get_deq, deq_kwargs: dict, forward_kwargs: dict, *, args=None, seed=0, B=3, d=7):
    torch.manual_seed(seed)
    layer = _Layer(d)
    x = torch.randn(B, d, dtype=torch.float64)
    deq = get_deq(args, **deq_kwargs) if args is not None else get_deq(**deq_kwargs)
    deq.train()
    z_out, info = deq(lambda z: layer(z, x), torch.zeros(B, d, dtype=torch.float64),
                      **forward_kwargs)
    loss = sum((z ** 2).sum() for z in z_out)
    loss.backward()
    return [p.grad.clone() for p in layer.parameters()], z_out, info


def _assert_same(ours, theirs):
    for g_ours, g_ref in zip(ours, theirs):
        torch.testing.assert_close(g_ours, g_ref, rtol=RTOL, atol=1e-12)


SOLVE = dict(f_solver="fixed_point_iter", f_max_iter=30, f_tol=1e-10)


@pytest.mark.parametrize("grad", [1, 3], ids=["grad1", "grad3"])
@pytest.mark.parametrize("core", ["sliced", "indexing"])
def test_explicit_ift_false_is_torchdeq_phantom(grad, core):
    kw = dict(SOLVE, core=core, ift=False, grad=grad, tau=0.5)
    ours, z_ours, _ = _grads(deq_fast.get_deq, kw, {})
    theirs, z_ref, _ = _grads(torchdeq.get_deq, kw, {})
    torch.testing.assert_close(z_ours[-1], z_ref[-1], rtol=1e-10, atol=1e-12)
    _assert_same(ours, theirs)
    # negative check: without ift=False deq_fast gives the exact gradient, which differs
    exact, _, _ = _grads(deq_fast.get_deq, dict(SOLVE, core=core, grad_mode="exact"), {})
    assert not torch.allclose(exact[0], theirs[0], rtol=1e-3)


def test_args_namespace_with_ift_false_is_torchdeq_phantom():
    parser = argparse.ArgumentParser()
    torchdeq.add_deq_args(parser)
    args = parser.parse_args(["--f_max_iter", "30", "--f_tol", "1e-10", "--grad", "3",
                              "--tau", "0.5"])
    ours, _, _ = _grads(deq_fast.get_deq, {}, {}, args=args)
    theirs, _, _ = _grads(torchdeq.get_deq, {}, {}, args=args)
    _assert_same(ours, theirs)
    assert deq_fast.get_deq(args).grad_mode == "phantom"


def test_nothing_said_keeps_exact_default():
    assert deq_fast.get_deq().grad_mode == "exact"
    assert deq_fast.get_deq(ift=True).grad_mode == "exact"
    assert deq_fast.get_deq(ift=False, grad_mode="exact").grad_mode == "exact"


@pytest.mark.parametrize("core", ["sliced", "indexing"])
def test_f_max_iter_zero_matches_torchdeq(core):
    # (with ift=True the two differ away from a fixed point: TorchDEQ takes J at f(z0), we at z0)
    kw = dict(f_solver="fixed_point_iter", f_max_iter=0, core=core, ift=False, grad=2, tau=0.5)
    ours, z_ours, info = _grads(deq_fast.get_deq, kw, {})
    theirs, z_ref, info_ref = _grads(torchdeq.get_deq, kw, {})
    torch.testing.assert_close(z_ours[-1], z_ref[-1], rtol=1e-12, atol=1e-12)
    _assert_same(ours, theirs)
    assert info["nstep"].tolist() == info_ref["nstep"].tolist() == [0.0] * 3
    assert info["abs_lowest"].tolist() == info_ref["abs_lowest"].tolist()


def test_f_max_iter_zero_in_evaluation_returns_z_init():
    deq = deq_fast.get_deq(f_max_iter=0).eval()
    z0 = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        z_out, info = deq(torch.tanh, z0)
    assert torch.equal(z_out[-1], z0) and info["nfe"] == 0


def test_writer_keyword_is_accepted_and_ignored():
    seen = []
    kw = dict(SOLVE, ift=False, grad=2, tau=0.5)
    ours, _, _ = _grads(deq_fast.get_deq, kw, {"writer": seen.append})
    theirs, _, _ = _grads(torchdeq.get_deq, kw, {"writer": seen.append})
    _assert_same(ours, theirs)
    assert seen == []   # writer= is not backward_writer: TorchDEQ ignores it too


def test_name_keyword_is_accepted():
    deq = deq_fast.get_deq(name="deq_layer", f_max_iter=5)
    assert deq.name == "deq_layer"
    torchdeq.get_deq(name="deq_layer")   # the same call is valid there


def test_non_converged_backward_warns_with_count_and_best_iterate():
    """A non-contractive map: the exact backward does not converge; it warns with the number of
    samples and the worst residual, and the gradient is the best iterate, not the zero start."""
    torch.manual_seed(0)
    d = 6
    W = nn.Parameter(1.5 * torch.eye(d, dtype=torch.float64)
                     + 0.1 * torch.randn(d, d, dtype=torch.float64))
    deq = deq_fast.get_deq(f_solver="fixed_point_iter", f_max_iter=3, b_max_iter=6,
                           b_solver="fixed_point_iter")
    z_out, info = deq(lambda z: z @ W.T, torch.randn(2, d, dtype=torch.float64))
    with pytest.warns(deq_fast.BackwardNotConverged, match=r"for 2 of 2 samples \(worst "
                                                           r"relative residual [0-9.e+]+\)") as rec:
        z_out[-1].sum().backward()
    advice = str(rec[0].message)                        # says what to do about it
    assert "raise b_max_iter or b_tol" in advice and "grad_mode='phantom'" in advice
    assert not info["b_converged"].any()
    assert (info["b_rel_residual"] != 1.0).all()
    assert W.grad is not None and W.grad.abs().sum() > 0
