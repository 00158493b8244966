"""apply_norm/reset_norm/remove_norm against torch's parametrizations; variational dropout masks
(device, dtype, shapes, fixed across solver iterations until reset_dropout). CPU only."""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P

from deq_fast.nn.deq import add_deq_args, get_deq, reset_deq
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
from deq_fast.nn.norm import _WeightNorm, apply_norm, remove_norm, reset_norm

LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (3, 7), 0),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5), 0),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 4, 3), (2, 3, 6), 1),
}


def _pair(kind, seed=0):
    make, in_shape, dim = LAYERS[kind]
    torch.manual_seed(seed)
    ours = make().double()
    ref = copy.deepcopy(ours)
    return ours, ref, torch.randn(*in_shape, dtype=torch.float64), dim


# ---------------------------------------------------------------------------------------------
# weight norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_norm_matches_torch_parametrization(kind):
    ours, ref, x, dim = _pair(kind)
    apply_norm(ours, "weight_norm")
    P.weight_norm(ref, dim=dim)
    assert torch.allclose(ours(x), ref(x), atol=1e-14)
    # gradients to (g, v) agree with torch's (original0, original1)
    go = torch.autograd.grad(ours(x).square().sum(), [ours.weight_g, ours.weight_v])
    gr = torch.autograd.grad(ref(x).square().sum(), [ref.parametrizations.weight.original0,
                                                     ref.parametrizations.weight.original1])
    for a, b in zip(go, gr):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    # a parameter update (as an optimizer step does) followed by reset_norm
    with torch.no_grad():
        for p_o, p_r in ((ours.weight_g, ref.parametrizations.weight.original0),
                         (ours.weight_v, ref.parametrizations.weight.original1)):
            delta = torch.randn_like(p_o) * 0.1
            p_o.add_(delta)
            p_r.add_(delta)
    reset_norm(ours)
    assert torch.allclose(ours(x), ref(x), atol=1e-14)


def test_weight_norm_options_scale_and_clip():
    lin = nn.Linear(4, 3).double()
    w0 = lin.weight.detach().clone()
    apply_norm(lin, "weight_norm", learn_scale=False, target_norm=2.0)
    assert "weight_g" not in dict(lin.named_parameters())
    assert torch.allclose(lin.weight.norm(dim=1), torch.full((3,), 2.0, dtype=torch.float64))
    lin2 = nn.Linear(4, 3).double()
    with torch.no_grad():
        lin2.weight.copy_(w0)
    apply_norm(lin2, "weight_norm", learn_scale=False, target_norm=100.0, clip=True,
               clip_value=1.5)
    assert torch.allclose(lin2.weight, 1.5 * w0)      # factor clipped to 1.5


def test_weight_norm_computed_once_per_step_inside_a_deq(monkeypatch):
    torch.manual_seed(1)
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    apply_norm(lin, "weight_norm", learn_scale=False, target_norm=0.5)
    calls = {"n": 0}
    orig = _WeightNorm.compute_weight

    def counting(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(_WeightNorm, "compute_weight", counting)
    x = torch.randn(2, 6, dtype=torch.float64)
    deq = get_deq(f_solver="fixed_point_iter", f_max_iter=25, f_tol=1e-12)
    for _ in range(2):
        reset_deq(lin)
        z_out, info = deq(lambda z: torch.tanh(lin(z) + x), torch.zeros(2, 6, dtype=torch.float64))
        z_out[-1].sum().backward()
    assert info["nfe"] >= 20
    assert calls["n"] == 2                             # once per reset, not per solver iteration
    assert lin.weight_v.grad is not None and torch.isfinite(lin.weight_v.grad).all()


def _expected_weight_norm(lin):
    return (lin.weight_v * lin.weight_g / lin.weight_v.norm(dim=1, keepdim=True)).detach()


def test_stale_weight_is_recomputed_after_optimizer_step_update_or_no_grad_reset():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    apply_norm(lin, "weight_norm")
    x = torch.randn(4, 3, dtype=torch.float64)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for p in lin.parameters():                        # a step the weight's backward did not see
        p.grad = torch.randn_like(p)
    opt.step()                                        # no reset_norm
    with torch.no_grad():
        y = lin(x)
    assert torch.allclose(y, x @ _expected_weight_norm(lin).T + lin.bias)
    with torch.no_grad():
        lin.weight_g.mul_(2.0)                        # a hand-written update: seen by the next DEQ
    deq = get_deq(f_solver="fixed_point_iter", f_max_iter=3)
    deq(lambda z: 0.1 * torch.tanh(lin(z)) + x, torch.zeros(4, 3, dtype=torch.float64))
    assert torch.allclose(lin.weight, _expected_weight_norm(lin))
    with torch.no_grad():
        reset_norm(lin)                               # the weight keeps its graph...
    lin(x).sum().backward()                           # ...so gradients reach the parameters
    assert lin.weight_g.grad is not None


class _Counts:
    """Counts of weight computations, stale pre-hook calls and staleness checks of one layer."""

    def __init__(self, monkeypatch, layer):
        from deq_fast.nn import norm
        self.computed = self.hooked = self.checked = 0
        compute, hook, outdated = _WeightNorm.compute_weight, norm._refresh_hook, norm._Norm.outdated

        def counting_compute(fn, module, *a, **k):
            self.computed += module is layer
            return compute(fn, module, *a, **k)

        def counting_hook(module, inputs):
            self.hooked += module is layer
            return hook(module, inputs)

        def counting_outdated(fn, module, *a, **k):
            self.checked += module is layer
            return outdated(fn, module, *a, **k)

        monkeypatch.setattr(_WeightNorm, "compute_weight", counting_compute)
        monkeypatch.setattr(norm, "_refresh_hook", counting_hook)
        monkeypatch.setattr(norm._Norm, "outdated", counting_outdated)

    def take(self):
        out = (self.computed, self.hooked, self.checked)
        self.computed = self.hooked = self.checked = 0
        return out


def test_no_staleness_work_per_layer_call(monkeypatch):
    """A DEQ step calls the layer ~25 times: the weight is computed once (reset_norm), no pre-hook
    runs and the staleness check runs once (per DEQ forward), not per call; without reset_norm,
    the backward marks it stale and the next step recomputes it exactly once; after an optimizer
    step, exactly once."""
    torch.manual_seed(1)
    lin = nn.Linear(6, 6).double()
    apply_norm(lin, "weight_norm", learn_scale=False, target_norm=0.5)
    counts = _Counts(monkeypatch, lin)
    x = torch.randn(2, 6, dtype=torch.float64)
    deq = get_deq(f_solver="fixed_point_iter", f_max_iter=25, f_tol=1e-12)
    opt = torch.optim.SGD(lin.parameters(), lr=1e-2)
    calls = []

    def f(z):
        calls.append(len(lin._forward_pre_hooks))
        return torch.tanh(lin(z) + x)

    def step():
        z_out, info = deq(f, torch.zeros(2, 6, dtype=torch.float64))
        z_out[-1].sum().backward()
        return info

    reset_norm(lin)
    counts.take()
    info = step()
    assert info["nfe"] >= 20 and set(calls) == {0}
    assert counts.take() == (0, 0, 1)                  # computed by reset_norm only
    assert len(lin._forward_pre_hooks) == 1            # consumed by the backward: stale
    step()                                             # gradient accumulation, no reset_norm
    assert counts.take() == (1, 1, 0)
    opt.step()                                         # stale again (consumed), stays one hook
    assert len(lin._forward_pre_hooks) == 1
    step()
    assert counts.take() == (1, 1, 0)
    with torch.no_grad():
        lin(x)                                          # stale after backward: recomputed once
    assert counts.take() == (1, 1, 0)
    for p in lin.parameters():
        p.grad = torch.ones_like(p)
    opt.step()                                         # not consumed: the version check sees it
    assert len(lin._forward_pre_hooks) == 1
    with torch.no_grad():
        lin(x), lin(x)
    assert counts.take() == (1, 1, 1)
    assert torch.allclose(lin.weight, 0.5 * lin.weight_v / lin.weight_v.norm(dim=1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# spectral norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(LAYERS))
def test_spectral_norm_matches_torch_parametrization(kind):
    ours, ref, x, dim = _pair(kind, seed=2)
    apply_norm(ours, "spectral_norm")
    P.spectral_norm(ref, dim=dim)
    sn = ref.parametrizations.weight[0]
    with torch.no_grad():                              # same power-iteration state
        ours.weight_u.copy_(sn._u)
        ours.weight_v.copy_(sn._v)
    ours.train(), ref.train()
    reset_norm(ours)                                   # one power step, as torch's forward does
    assert torch.allclose(ours.weight, ref.weight, rtol=1e-12, atol=1e-14)
    assert torch.allclose(ours.weight_u, sn._u, atol=1e-14)
    ours.eval(), ref.eval()
    reset_norm(ours)                                   # no power step in eval (as torch)
    assert torch.allclose(ours(x), ref(x), atol=1e-13)


def test_spectral_norm_is_normalised_from_the_start():
    torch.manual_seed(3)
    lin = nn.Linear(8, 6).double()
    apply_norm(lin, "spectral_norm", n_power_iterations=30)
    sigma = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    assert abs(float(sigma) - 1.0) < 1e-6              # TorchDEQ: raw weight until reset_norm
    assert {"weight_orig", "weight_g"} <= set(dict(lin.named_parameters()))
    assert {"weight_u", "weight_v"} <= set(dict(lin.named_buffers()))


def test_remove_norm_folds_weight():
    for norm in ("weight_norm", "spectral_norm"):
        torch.manual_seed(4)
        net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Conv1d(5, 2, 1)).double()
        apply_norm(net, norm)
        x = torch.randn(3, 4, dtype=torch.float64)
        net.eval()
        reset_norm(net)
        before = net[0](x)
        remove_norm(net)
        assert isinstance(net[0].weight, nn.Parameter)
        assert set(dict(net[0].named_parameters())) == {"weight", "bias"}
        assert not hasattr(net[0], "_deq_norm") and not net[0]._forward_pre_hooks
        assert torch.allclose(net[0](x), before, atol=1e-14)


def test_apply_norm_filters_args_and_errors():
    net = nn.ModuleDict({"embedding": nn.Linear(3, 3), "body": nn.Linear(3, 3),
                         "head": nn.Linear(3, 3)})
    apply_norm(net, "weight_norm", filter_out="embed", prefix_filter_out=["head"])
    assert [k for k, m in net.items() if hasattr(m, "_deq_norm")] == ["body"]
    with pytest.raises(ValueError, match="already normalised"):
        apply_norm(net, "weight_norm")
    with pytest.raises(ValueError, match="norm_type"):
        apply_norm(nn.Linear(2, 2), "batch_norm")
    with pytest.raises(TypeError, match="target_nrom"):
        apply_norm(nn.Linear(2, 2), "weight_norm", target_nrom=1.0)
    lin = nn.Linear(2, 2)
    apply_norm(lin, "weight_norm", args={"norm_type": "none"})
    assert not hasattr(lin, "_deq_norm")
    args = add_deq_args(argparse.ArgumentParser()).parse_args(
        ["--norm_type", "spectral_norm", "--norm_no_scale", "--sn_n_power_iters", "3"])
    lin = nn.Linear(2, 2)
    apply_norm(lin, args=args)
    assert lin._deq_norm.n_power_iterations == 3 and not lin._deq_norm.learn_scale


# ---------------------------------------------------------------------------------------------
# variational dropout
# ---------------------------------------------------------------------------------------------

CASES = [  # class, input shape, token_first, expected mask shape
    (VariationalDropout1d, (2, 5, 3), True, (2, 1, 3)),
    (VariationalDropout1d, (2, 3, 5), False, (2, 3, 1)),
    (VariationalDropout2d, (2, 4, 5, 3), True, (2, 1, 1, 3)),
    (VariationalDropout2d, (2, 3, 4, 5), False, (2, 3, 1, 1)),
    (VariationalDropout3d, (2, 2, 3, 4, 3), True, (2, 1, 1, 1, 3)),
    (VariationalDropout3d, (2, 3, 2, 3, 4), False, (2, 3, 1, 1, 1)),
    (VariationalDropToken1d, (2, 5, 3), True, (2, 5, 1)),
    (VariationalDropToken1d, (2, 3, 5), False, (2, 1, 5)),
    (VariationalDropToken2d, (2, 4, 5, 3), True, (2, 4, 5, 1)),
    (VariationalDropToken2d, (2, 3, 4, 5), False, (2, 1, 4, 5)),
    (VariationalDropToken3d, (2, 2, 3, 4, 3), True, (2, 2, 3, 4, 1)),
    (VariationalDropToken3d, (2, 3, 2, 3, 4), False, (2, 1, 2, 3, 4)),
    (VariationalDropout, (3, 7), True, (3, 7)),
]


@pytest.mark.parametrize("cls,shape,token_first,mask_shape", CASES,
                         ids=[f"{c[0].__name__}-{'tf' if c[2] else 'cf'}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dropout_mask_shape_dtype_values(cls, shape, token_first, mask_shape, dtype):
    torch.manual_seed(5)
    p = 0.4
    m = cls(p, token_first=token_first)
    x = torch.randn(*shape).to(dtype)
    y = m(x)
    assert m.mask.shape == mask_shape and m.mask.dtype == dtype and y.dtype == dtype
    for v in m.mask.float().unique().tolist():
        assert v == 0.0 or v == pytest.approx(1 / (1 - p), rel=1e-2)
    assert torch.equal(y, x * m.mask)


def test_dropout_mask_on_input_device():
    # the meta device stands in for CUDA: TorchDEQ draws masks on the CPU (torchdeq issue #13)
    x = torch.empty(2, 3, 4, 5, device="meta")
    m = VariationalDropout2d(0.3, token_first=False)
    assert m(x).device.type == "meta" and m.mask.device.type == "meta"
    import torchdeq.dropout as tq
    with pytest.raises(Exception):
        tq.VariationalDropout2d(0.3, token_first=False)(x)


def test_dropout_mask_fixed_across_solver_iterations_until_reset():
    torch.manual_seed(6)
    drop = VariationalDropout1d(0.5, token_first=False)
    lin = nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    masks = []

    def f(z):
        out = drop(torch.tanh(lin(z).transpose(1, 2))).transpose(1, 2)
        masks.append(drop.mask)
        return out

    deq = get_deq(f_solver="anderson", f_max_iter=20, f_tol=1e-10)
    z0 = torch.zeros(3, 5, 4, dtype=torch.float64)
    deq(f, z0)
    assert len(masks) > 5 and all(m is masks[0] for m in masks)
    first = masks[0].clone()
    reset_dropout(nn.ModuleList([drop]))
    masks.clear()
    deq(f, z0)
    assert all(m is masks[0] for m in masks) and not torch.equal(masks[0], first)


def test_dropout_eval_zero_one_and_errors():
    x = torch.randn(2, 3, 4)
    m = VariationalDropout1d(0.5)
    m.eval()
    assert m(x) is x
    assert VariationalDropout1d(0.0)(x) is x
    assert torch.equal(VariationalDropout1d(1.0)(x), torch.zeros_like(x))   # not NaN
    with pytest.raises(ValueError, match="dropout"):
        VariationalDropout1d(1.5)
    with pytest.raises(ValueError, match="3-D"):
        VariationalDropout1d(0.5)(torch.randn(2, 3))
    m = VariationalDropToken2d(0.5)
    m(torch.randn(2, 3, 4, 5))
    assert m(torch.randn(1, 3, 4, 5)).shape == (1, 3, 4, 5)   # new batch size: a new mask


def test_reset_deq_resets_norm_and_dropout():
    net = nn.Sequential(nn.Linear(3, 3), VariationalDropout(0.5))
    apply_norm(net, "weight_norm")
    net(torch.randn(2, 3))
    assert net[1].mask is not None
    w_before = net[0].weight
    reset_deq(net)
    assert net[1].mask is None and net[0].weight is not w_before


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_normalised_layers_deepcopy_pickle_and_state_dict(norm, tmp_path):
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Conv1d(4, 2, 1)).double()
    apply_norm(net, norm)
    x = torch.randn(2, 3, dtype=torch.float64)
    net[0](x).sum().backward()
    twin = copy.deepcopy(net)                       # torch's old weight_norm fails here
    assert isinstance(twin[0], nn.Linear) and twin[0]._deq_norm is not net[0]._deq_norm
    twin.eval(), net.eval()                         # (no extra spectral-norm power step)
    twin[0](x).sum().backward()                     # the copy recomputes a weight with a graph
    assert twin[0].weight_g.grad is not None
    assert torch.allclose(twin[0](x), net[0](x))
    torch.save(net, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False).eval()
    assert torch.allclose(loaded[0](x), net[0](x))
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Conv1d(4, 2, 1)).double()
    apply_norm(fresh, norm)
    fresh.load_state_dict(net.state_dict())
    fresh.eval(), net.eval()
    reset_norm(fresh), reset_norm(net)
    assert torch.allclose(fresh[0](x), net[0](x))
    remove_norm(net)
    assert type(net[0]) is nn.Linear


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_loaded_or_converted_layer_recomputes_its_weight_without_reset_norm(norm):
    """load_state_dict and .double() replace the parameters outside any DEQ forward or optimizer
    step: the layer's next call (no reset_norm, no DEQ) computes with the new ones."""
    torch.manual_seed(8)
    src, dst = nn.Linear(3, 4), nn.Linear(3, 4)
    apply_norm(src, norm), apply_norm(dst, norm)
    src.eval(), dst.eval()                          # (no spectral-norm power step on recompute)
    x = torch.randn(2, 3)
    dst.load_state_dict(src.state_dict())
    assert torch.allclose(dst(x), src(x))
    dst.double()
    y = dst(x.double())
    assert y.dtype == torch.float64 and torch.allclose(y, src(x).double(), atol=1e-6)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_gradient_accumulation_without_reset_norm(norm):
    torch.manual_seed(8)
    lin = nn.Linear(4, 3).double()
    apply_norm(lin, norm)
    lin.eval()                                      # no spectral power step between the passes
    reset_norm(lin)
    x = torch.randn(5, 4, dtype=torch.float64)
    params = [p for p in lin.parameters()]
    lin(x).square().sum().backward()
    once = [p.grad.clone() for p in params]
    lin(x).square().sum().backward()                # TorchDEQ: "backward through the graph a second time"
    for p, g in zip(params, once):
        assert torch.allclose(p.grad, 2 * g, rtol=1e-12)
