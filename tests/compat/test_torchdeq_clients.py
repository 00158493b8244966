"""TorchDEQ clients' patterns (the DEQ Zoo's) against the installed torchdeq 0.1.0, float64.

Each model is written here (tiny, self-made) and run twice with the same weights and inputs: once
with ``torchdeq``, once with ``deq_fast.torchdeq`` (the only change a migrating client makes).
Forward statistics must be equal and parameter gradients within 1e-5 relative.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil

import pytest
import torch
import torchdeq
from torch import nn

import deq_fast.torchdeq as ours  # noqa: E402

DT = torch.float64
RTOL = 1e-5


def _public(modname: str) -> set[str]:
    mod = importlib.import_module(modname)
    names = set(getattr(mod, "__all__", []))
    for n, obj in vars(mod).items():
        if n.startswith("_") or inspect.ismodule(obj):
            continue
        if getattr(obj, "__module__", "") and str(getattr(obj, "__module__", "")).startswith("torchdeq"):
            names.add(n)
    return names


_MODULES = ["torchdeq"] + [m.name for m in pkgutil.walk_packages(torchdeq.__path__, "torchdeq.")]


@pytest.mark.parametrize("modname", _MODULES)
def test_every_public_name_at_every_module_path(modname):
    mine = importlib.import_module("deq_fast." + modname)
    missing = sorted(n for n in _public(modname) if not hasattr(mine, n))
    assert not missing, f"deq_fast.{modname} lacks {missing}"


def _args(argv=()):
    """A client's namespace from the library's own add_deq_args (TorchDEQ's)."""
    p = argparse.ArgumentParser()
    torchdeq.utils.add_deq_args(p)
    return p.parse_args(list(argv))


def _ours_args(argv=()):
    p = argparse.ArgumentParser()
    ours.utils.add_deq_args(p)
    return p.parse_args(list(argv))


def test_add_deq_args_same_defaults():
    assert vars(_args()) == vars(_ours_args())


def _compare(build, run, argv=(), steps=1):
    """build(lib, args) -> model; run(model, lib) -> (loss, info). Same seed, same weights."""
    torch.manual_seed(0)
    ref = build(torchdeq, _args(argv)).to(DT)
    torch.manual_seed(0)
    mine = build(ours, _ours_args(argv)).to(DT)
    mine.load_state_dict(ref.state_dict())
    for _ in range(steps):
        torch.manual_seed(1)
        loss_r, info_r = run(ref, torchdeq)
        torch.manual_seed(1)
        loss_m, info_m = run(mine, ours)
        for key in ("nstep", "abs_lowest", "rel_lowest"):
            torch.testing.assert_close(info_m[key].to(DT), info_r[key].to(DT), rtol=1e-6,
                                       atol=1e-9, msg=f"info[{key!r}]")
        ref.zero_grad()
        mine.zero_grad()
        loss_r.backward()
        loss_m.backward()
        pr, pm = dict(ref.named_parameters()), dict(mine.named_parameters())
        assert pr.keys() == pm.keys()
        for name in pr:
            gr, gm = pr[name].grad, pm[name].grad
            assert (gr is None) == (gm is None), name
            if gr is not None:
                err = (gm - gr).norm() / gr.norm().clamp_min(1e-30)
                assert err < RTOL, f"{name}: relative gradient error {err:.2e}"


# --- DEQ transformer block (deq-lm / deq-seq): f_max_iter 0 and solver_stat_from_final_step ----

class Block(nn.Module):
    def __init__(self, lib, args, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, d))
        self.ln = nn.LayerNorm(d)
        self.inj = nn.Linear(d, d)
        self.lib, self.args = lib, args
        self.deq = lib.get_deq(args, name="lm")

    def forward(self, x):
        mem_gc = importlib.import_module(self.lib.__name__ + ".utils.mem").mem_gc
        stat = importlib.import_module(self.lib.__name__ + ".solver").solver_stat_from_final_step
        u = self.inj(x)

        def f(z):
            h = self.ln(z + u)
            a = self.attn(h, h, h, need_weights=False)[0]
            return 0.5 * torch.tanh(mem_gc(self.ff, (h + a,)))
        z_out, info = self.deq(f, torch.zeros_like(x))
        with torch.no_grad():
            info2 = stat(z_out[-1], f(z_out[-1]), self.args.grad[-1])
        return sum(z.pow(2).mean() for z in z_out), info, info2


@pytest.mark.parametrize("argv", [["--f_solver", "anderson", "--f_max_iter", "12"],
                                  ["--f_solver", "broyden", "--f_max_iter", "0"],
                                  ["--f_solver", "fixed_point_iter", "--grad", "3", "--tau",
                                   "0.7"]], ids=["anderson", "f_max_iter0", "phantom3"])
def test_transformer_block(argv):
    x = torch.randn(2, 5, 8, dtype=DT)
    holder = {}

    def run(model, lib):
        loss, info, info2 = model(x)
        holder[lib.__name__] = info2
        return loss, info
    _compare(lambda lib, a: Block(lib, a), run, argv)
    torch.testing.assert_close(holder["deq_fast.torchdeq"]["abs_lowest"],
                               holder["torchdeq"]["abs_lowest"])


# --- MDEQ-like multiscale cell: list states, writer=, a custom normalised module -------------

class Mix(nn.Module):
    """A self-made layer whose two matrices are normalised through register_norm_module."""

    def __init__(self, c):
        super().__init__()
        self.A = nn.Parameter(torch.randn(c, c) / c)
        self.B = nn.Parameter(torch.randn(c, c) / c)

    def forward(self, z1, z2):
        return torch.einsum("ij,bjhw->bihw", self.A, z1), torch.einsum("ij,bjhw->bihw", self.B, z2)


_MIXES = {}


def _mix_class(lib):
    if lib.__name__ not in _MIXES:
        cls = type(f"Mix_{lib.__name__.replace('.', '_')}", (Mix,), {})
        lib.norm.register_norm_module(cls, "weight_norm", names=["A", "B"], dims=[0, 0])
        _MIXES[lib.__name__] = cls
    return _MIXES[lib.__name__]


class MultiScale(nn.Module):
    def __init__(self, lib, args, c=4):
        super().__init__()
        self.lib = lib
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.mix = _mix_class(lib)(c)
        self.stage = nn.ModuleList([self.c1, self.c2, self.down, self.mix])
        lib.norm.apply_norm(self.stage, args=args)
        self.deq = lib.get_deq(args)

    def forward(self, x, **kwargs):
        self.lib.norm.reset_norm(self.stage)
        z0 = [torch.zeros_like(x), torch.zeros(x.shape[0], x.shape[1], 2, 2, dtype=x.dtype)]

        def f(z1, z2):
            m1, m2 = self.mix(z1, z2)
            y1 = torch.tanh(0.3 * self.c1(z1) + 0.3 * m1 + x)
            y2 = torch.tanh(0.3 * self.c2(z2) + 0.3 * m2 + 0.3 * self.down(z1))
            return [y1, y2]
        z_out, info = self.deq(f, z0, writer=kwargs.get("writer"))
        return sum(z[0].pow(2).sum() + z[1].pow(2).sum() for z in z_out), info


@pytest.mark.parametrize("argv", [["--f_solver", "broyden", "--f_max_iter", "15", "--tau", "0.6",
                                   "--grad", "2"],
                                  ["--f_solver", "anderson", "--n_states", "2", "--f_max_iter", "10"],
                                  ["--f_solver", "fixed_point_iter", "--ift", "--b_tol", "1e-10",
                                   "--b_max_iter", "200", "--f_tol", "1e-10", "--f_max_iter", "200"]],
                         ids=["broyden-phantom", "anderson-nstates2", "fp-ift"])
def test_multiscale_writer_and_custom_norm(argv):
    x = torch.randn(2, 4, 4, 4, dtype=DT)
    _compare(lambda lib, a: MultiScale(lib, a), lambda m, lib: m(x, writer=object()), argv)


def test_apply_norm_normalises_registered_custom_module():
    m = MultiScale(ours, _ours_args())
    assert hasattr(m.mix, "A_v") and hasattr(m.mix, "B_g"), "custom module not normalised"


# --- IGNN-style implicit graph layer: non-contiguous f output, Broyden ------------------------

class Graph(nn.Module):
    def __init__(self, lib, args, m=6, p=3, n=7):
        super().__init__()
        self.W = nn.Parameter(torch.randn(m, m) / m)
        self.Om = nn.Parameter(torch.randn(m, p) / p)
        self.deq = lib.get_deq(args)
        A = (torch.rand(n, n) < 0.4).to(DT)
        self.register_buffer("At", (A / A.sum(0).clamp_min(1)).T.contiguous())

    def forward(self, U):
        B = (self.Om @ U.T)                                  # (m, n)
        def f(X):
            return torch.relu(torch.mm(self.At, torch.mm(X.T, (0.5 * self.W).T)).T + B)
        X_out, info = self.deq(f, torch.zeros_like(B))
        return X_out[-1].pow(2).sum(), info


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point_iter"])
def test_implicit_graph(solver):
    U = torch.randn(7, 3, dtype=DT)
    _compare(lambda lib, a: Graph(lib, a), lambda m, lib: m(U),
             ["--f_solver", solver, "--f_max_iter", "30", "--f_tol", "1e-8"])


# --- TorchDEQ docstring examples: 0-d and small states ----------------------------------------

class Scalar(nn.Module):
    def __init__(self, lib, args):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.deq = lib.get_deq(f_solver="anderson", f_max_iter=20)

    def forward(self, x):
        z_out, info = self.deq(lambda z: torch.tanh(self.w * z + x), torch.tensor(0.0, dtype=DT))
        return z_out[-1] ** 2, info


def test_docstring_scalar_state():
    _compare(lambda lib, a: Scalar(lib, a), lambda m, lib: m(torch.tensor(0.3, dtype=DT)))
