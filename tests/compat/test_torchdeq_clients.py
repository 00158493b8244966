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


def _compare(build, run, argv=(), steps=1, tie_floor=0.0):
    """build(lib, args) -> model; run(model, lib) -> (loss, info). Same seed, same weights.

    ``tie_floor``: samples whose lowest residual is under it (rounding level: every later step
    ties) have no well-defined ``nstep``; it is compared for the others only."""
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
        defined = info_r["abs_lowest"].to(DT) > tie_floor
        for key in ("nstep", "abs_lowest", "rel_lowest"):
            a_m, a_r = info_m[key].to(DT), info_r[key].to(DT)
            if key == "nstep":
                a_m, a_r = a_m[defined], a_r[defined]
            torch.testing.assert_close(a_m, a_r, rtol=1e-6, atol=1e-9, msg=f"info[{key!r}]")
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


def _sub(lib, name):
    return importlib.import_module(f"{lib.__name__}.{name}")


# --- deq-flow: a (hidden, coordinates) tuple state, correlation lookup, fp_correction ----------

def _coords_grid(b, h, w):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    return torch.stack([xs, ys])[None].repeat(b, 1, 1, 1)


class FlowUpdate(nn.Module):
    """A convolutional GRU on [hidden, context, motion features] and a flow head (RAFT-style)."""

    def __init__(self, hdim=4, cdim=4, r=1):
        super().__init__()
        cor = (2 * r + 1) ** 2
        self.enc = nn.Conv2d(cor + 2, 4, 3, padding=1)
        self.convz, self.convr, self.convq = (nn.Conv2d(hdim + cdim + 4, hdim, 3, padding=1)
                                              for _ in range(3))
        self.head = nn.Conv2d(hdim, 2, 3, padding=1)

    def forward(self, h, inp, corr, flow):
        motion = torch.relu(self.enc(torch.cat([corr, flow], 1)))
        hx = torch.cat([h, inp, motion], 1)
        z, r = torch.sigmoid(self.convz(hx)), torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, inp, motion], 1)))
        h = (1 - z) * h + z * q
        return h, 0.1 * self.head(h)


class Flow(nn.Module):
    def __init__(self, lib, args, hdim=4, cdim=4):
        super().__init__()
        self.lib, self.args, self.hdim = lib, args, hdim
        self.fnet = nn.Conv2d(3, 4, 3, padding=1)
        self.cnet = nn.Conv2d(3, cdim, 3, padding=1)
        self.update_block = FlowUpdate(hdim, cdim)
        self.mask = nn.Conv2d(hdim, 2, 1)
        lib.norm.apply_norm(self.update_block, args=args)
        self.deq = lib.get_deq(args)

    def _corr_fn(self, f1, f2):
        B, C, H, W = f1.shape
        corr = torch.einsum("bchw,bcuv->bhwuv", f1, f2).reshape(B * H * W, 1, H, W) / C ** 0.5
        d = torch.arange(-1, 2, dtype=DT)
        delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), -1)[None]          # (1, 3, 3, 2)

        def lookup(coords):
            cen = coords.permute(0, 2, 3, 1).reshape(B * H * W, 1, 1, 2) + delta
            grid = torch.stack([2 * cen[..., 0] / (W - 1) - 1, 2 * cen[..., 1] / (H - 1) - 1], -1)
            out = nn.functional.grid_sample(corr, grid, align_corners=True)
            return out.reshape(B, H, W, 9).permute(0, 3, 1, 2)
        return lookup

    def forward(self, img1, img2, flow_gt, valid, writer=None, sradius_mode=False, **kwargs):
        corr_fn = self._corr_fn(self.fnet(img1), self.fnet(img2))
        inp = torch.relu(self.cnet(img1))
        B, _, H, W = inp.shape
        coords0, coords1 = _coords_grid(B, H, W), _coords_grid(B, H, W)
        net = torch.zeros(B, self.hdim, H, W, dtype=DT)
        self.lib.norm.reset_norm(self.update_block)

        def func(h, c):
            if not getattr(self.args, "all_grad", False):
                c = c.detach()
            new_h, delta = self.update_block(h, inp, corr_fn(c), c - coords0)
            return new_h, c + delta
        z_out, info = self.deq(func, (net, coords1), sradius_mode=sradius_mode, backward_writer=writer,
                               **kwargs)
        preds = [c - coords0 + 0.1 * self.mask(h) for h, c in z_out]
        if not self.training:
            return preds[-1], info
        crit = lambda pred, gt, valid: ((pred - gt).abs() * valid).mean()     # noqa: E731
        loss = _sub(self.lib, "loss").fp_correction(crit, (preds, flow_gt, valid), gamma=self.args.gamma)
        return loss, info


def _flow_inputs():
    g = torch.Generator().manual_seed(4)
    img1, img2 = (torch.rand(2, 3, 5, 6, generator=g, dtype=DT) for _ in range(2))
    gt = torch.randn(2, 2, 5, 6, generator=g, dtype=DT)
    return img1, img2, gt, (torch.rand(2, 1, 5, 6, generator=g) > 0.2).to(DT)


FLOW_ARGV = {
    # train_B.sh / train_H.sh, stage 1 and 2 (stage 2 adds --all_grad: a client-side flag)
    "chairs": ["--f_max_iter", "36", "--f_solver", "simple_fixed_point_iter", "--n_states", "6",
               "--grad", "1"],
    "things": ["--f_max_iter", "40", "--f_solver", "simple_fixed_point_iter", "--n_states", "2",
               "--grad", "3"],
    "ift-writer": ["--f_solver", "broyden", "--f_max_iter", "20", "--ift", "--b_solver", "anderson",
                   "--b_max_iter", "20"],
}


@pytest.mark.parametrize("case", list(FLOW_ARGV))
def test_deq_flow(case):
    img1, img2, gt, valid = _flow_inputs()
    writes = {}

    def build(lib, a):
        a.all_grad = case == "things"
        return Flow(lib, a)

    def run(model, lib):
        writer = lambda info: writes.setdefault(lib.__name__, []).append(   # noqa: E731
            {k: info[k].detach().clone() for k in ("abs_lowest", "rel_lowest", "nstep")})
        return model(img1, img2, gt, valid, writer=writer)
    _compare(build, run, FLOW_ARGV[case])
    assert writes.keys() in ({"torchdeq", "deq_fast.torchdeq"}, set())
    if writes:
        assert len(writes["torchdeq"]) == len(writes["deq_fast.torchdeq"]) > 0
        for a, b in zip(writes["deq_fast.torchdeq"], writes["torchdeq"]):
            for k in a:
                torch.testing.assert_close(a[k].to(DT), b[k].to(DT), rtol=1e-6, atol=1e-9, msg=k)


def test_deq_flow_eval():
    """val.sh: fixed_point_iter, 40 iterations times eval_factor 1.5, sradius_mode, no gradients."""
    img1, img2, gt, valid = _flow_inputs()
    argv = ["--f_max_iter", "40", "--f_solver", "fixed_point_iter", "--eval_factor", "1.5"]
    out = {}
    for lib, args in ((torchdeq, _args(argv)), (ours, _ours_args(argv))):
        torch.manual_seed(0)
        model = Flow(lib, args).to(DT).eval()
        if lib is ours:
            model.load_state_dict(out["torchdeq"][0])
        with torch.no_grad():
            flow, info = model(img1, img2, gt, valid, sradius_mode=True)
        out[lib.__name__] = (model.state_dict(), flow, info)
    (_, fr, ir), (_, fm, im) = out["torchdeq"], out["deq_fast.torchdeq"]
    torch.testing.assert_close(fm, fr, rtol=1e-6, atol=1e-9)
    for key in ("nstep", "abs_lowest", "rel_lowest"):
        torch.testing.assert_close(im[key].to(DT), ir[key].to(DT), rtol=1e-6, atol=1e-9, msg=key)
    assert "sradius" in im and im["sradius"].shape == ir["sradius"].shape   # values: ours fixed


# --- deq-inr: a 2-D (points, channels) state, solver_kwargs={'f_max_iter': 0} on cached states --

class MFN(nn.Module):
    def __init__(self, c, n_layers):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(c, c) for _ in range(n_layers))
        for lin in self.layers:
            nn.init.uniform_(lin.weight, -(1 / c) ** 0.5, (1 / c) ** 0.5)
        self.register_buffer("z_init", torch.ones(1, c))

    def forward(self, z, u):                      # Fourier filter: u * z
        z = z + self.z_init * u[0]
        for i, layer in enumerate(self.layers):
            z = u[i + 1] * layer(z)
        return z


class INR(nn.Module):
    def __init__(self, lib, args, c=8, n_layers=1, scale=4.0):
        super().__init__()
        self.lib, self.c = lib, c
        self.x_map = nn.Linear(2, c * (n_layers + 1))
        with torch.no_grad():
            self.x_map.weight.mul_(scale)
            self.x_map.bias.uniform_(-3.14, 3.14)
        self.n = n_layers + 1
        self.f = MFN(c, n_layers)
        self.output_map = nn.Linear(c, 1)
        lib.norm.apply_norm(self.f, args=args)
        self.deq = lib.get_deq(args)

    def forward(self, x, z=None, skip_solver=False, **kwargs):
        if z is None:
            z = torch.zeros(*x.shape[:-1], self.c, dtype=x.dtype)
        u = torch.sin(self.x_map(x)).chunk(self.n, dim=-1)
        self.lib.norm.reset_norm(self.f)
        solver_kwargs = {"f_max_iter": 0} if skip_solver else {}
        z_out, info = self.deq(lambda z: self.f(z, u), z, solver_kwargs=solver_kwargs, **kwargs)
        nstep = info["nstep"].mean().item()
        return {"output": self.output_map(z_out[-1]), "imp_layer_output": z_out[-1],
                "forward_steps": nstep}, info


INR_ARGV = {
    # configs/video/DEQ-siren_like-1L2048D.yaml (tiny width); loss through fp_correction
    "video": ["--f_solver", "fixed_point_iter", "--f_max_iter", "20", "--f_stop_mode", "rel",
              "--f_tol", "1e-6", "--grad", "3", "--n_states", "2", "--norm_type", "weight_norm"],
    # configs/image_representation: 100 iterations, grad 3; later steps skip the solver and
    # start from the cached equilibrium
    "image-cached": ["--f_solver", "fixed_point_iter", "--f_max_iter", "100", "--grad", "3"],
}


@pytest.mark.parametrize("case", list(INR_ARGV))
def test_deq_inr(case):
    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(12, 2, generator=g, dtype=DT), torch.rand(12, 1, generator=g, dtype=DT)
    caches = {}
    crit = lambda a, b: torch.mean((a - b) ** 2)                                   # noqa: E731

    def run(model, lib):
        step = caches.setdefault(lib.__name__, {"i": 0, "z": torch.zeros(12, 8, dtype=DT)})
        skip = case == "image-cached" and step["i"] > 0
        out, info = model(x, step["z"], skip_solver=skip)
        step["i"] += 1
        if case == "image-cached":
            step["z"] = out["imp_layer_output"].detach()
            return crit(out["output"], y), info
        loss, values = _sub(lib, "loss").fp_correction(crit, (out["output"], y), return_loss_values=True)
        assert isinstance(values, list) and len(values) == 1
        return loss, info
    _compare(lambda lib, a: INR(lib, a), run, INR_ARGV[case], steps=2 if case == "image-cached" else 1)


# --- deq-ddim: the solver's start is the optimised latent; the map couples the batch rows ------

class EpsNet(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, 6, 3, padding=1), nn.Conv2d(6, c, 3, padding=1)
        self.temb = nn.Linear(1, 6)

    def forward(self, x, t):
        h = torch.relu(self.c1(x) + self.temb((t.to(x.dtype) / 1000)[:, None])[:, :, None, None])
        return 0.3 * self.c2(h)


class DDIM(nn.Module):
    def __init__(self, lib, args, T=4, c=3, hw=4):
        super().__init__()
        self.model = EpsNet(c)
        self.deq = lib.get_deq(args)
        g = torch.Generator().manual_seed(8)
        self.all_xt = nn.Parameter(torch.randn(1, c, hw, hw, generator=g).repeat(T + 1, 1, 1, 1))
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        seq = list(range(0, 1000, 1000 // T))
        abar = (1 - torch.cat([torch.zeros(1, dtype=DT), betas])).cumprod(0)
        alpha = lambda t: abar[t + 1].view(-1, 1, 1, 1)                                   # noqa: E731
        t = torch.tensor(seq[::-1])
        nt = torch.tensor(([-1] + seq[:-1])[::-1])
        at, at_next = alpha(t), alpha(nt)
        self.T, self.t = T, t
        self.register_buffer("alpha_ratio", (at_next / at[0]).sqrt())
        self.register_buffer("et_coeff", (1 / at_next.sqrt())
                             * ((1 - at_next).sqrt() - ((1 - at) * at_next / at).sqrt()))
        self.register_buffer("et_prevsum_coeff", at_next.sqrt())

    def forward(self, x, solver_kwargs=None):
        xT = x[0].unsqueeze(0)
        all_xT = self.alpha_ratio * torch.repeat_interleave(xT, self.T, dim=0)

        def func(xt):
            et = self.et_coeff * self.model(xt[:-1], self.t)
            xt_next = all_xT + self.et_prevsum_coeff * et.cumsum(dim=0)
            xt_all = torch.zeros_like(xt)
            xt_all[[0]] = xT
            xt_all[1:] = xt_next
            return xt_all
        if solver_kwargs is None:
            solver_kwargs = {"m": 5, "lam": 1e-3, "beta": 1.0}     # the client's anderson_params
        x_pred, info = self.deq(func, x, solver_kwargs=solver_kwargs)
        return x_pred[-1], info


@pytest.mark.parametrize("argv", [["--f_solver", "anderson", "--f_max_iter", "15", "--tau", "0.1"],
                                  ["--f_solver", "anderson", "--f_max_iter", "15"]],
                         ids=["invert_models_deq.sh", "tau1"])
def test_deq_ddim_latent_optimisation(argv):
    target = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(9), dtype=DT)

    def run(model, lib):
        x_eq, info = model(model.all_xt)
        return (x_eq[-1:] - target).square().sum(dim=(1, 2, 3)).mean(dim=0), info
    # the chain is triangular: the first rows converge to rounding level, where nstep is a tie
    _compare(lambda lib, a: DDIM(lib, a), run, argv, tie_floor=1e-12)


# --- deq-seq: IFT with Broyden both ways, weight norm, variational dropout, jac_reg -------------

class SeqFunc(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.qkv = nn.Conv1d(d, 3 * d, 1, bias=False)
        self.ff1, self.ff2 = nn.Conv1d(d, 10, 1), nn.Conv1d(10, d, 1)
        self.ln = nn.GroupNorm(1, d)
        self.d = d

    def forward(self, z, z_hist, u, pos):
        qlen, mlen = z.shape[2], z_hist.shape[2]
        q, k, v = torch.chunk(self.qkv(torch.cat([z_hist, z], 2)) + u, 3, dim=1)
        q = q[:, :, -qlen:] + pos[:, :, -qlen:]
        score = torch.einsum("bdi,bdj->bij", q, k) / self.d ** 0.5
        mask = torch.triu(torch.ones(qlen, mlen + qlen, dtype=torch.bool), diagonal=1 + mlen)
        attn = score.masked_fill(mask[None], -float("inf")).softmax(-1)
        h = self.ln(0.5 * torch.einsum("bij,bdj->bdi", attn, v) + z)
        return torch.tanh(0.5 * self.ff2(torch.relu(self.ff1(h))) + 0.5 * h)


class SeqLM(nn.Module):
    def __init__(self, lib, args, d=6, vocab=11):
        super().__init__()
        self.lib, self.args, self.d = lib, args, d
        self.word_emb = nn.Embedding(vocab, d)
        self.iodrop = lib.dropout.VariationalDropout1d(dropout=0.1)
        self.inject_conv = nn.Conv1d(d, 3 * d, 1)
        self.func = SeqFunc(d)
        self.crit_lin = nn.Linear(d, vocab)
        lib.norm.apply_norm(self.func, args=args)
        self.deq = lib.get_deq(args)

    def crit(self, z_pred, target):
        logits = self.crit_lin(z_pred.transpose(1, 2))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    def forward(self, data, target, mems, writer=None, compute_jac_loss=True):
        self.lib.reset_deq(self)
        bsz, qlen = data.shape
        u_now = self.inject_conv(self.iodrop(self.word_emb(data)).transpose(1, 2))
        z_hist, u_hist = mems if mems else (torch.zeros(bsz, self.d, 0, dtype=DT),
                                            torch.zeros(bsz, 3 * self.d, 0, dtype=DT))
        mlen = z_hist.shape[2]
        pos = torch.sin(torch.arange(mlen + qlen - 1, -1, -1.0, dtype=DT) / 3)[None, None]
        u_cat = torch.cat([u_hist, u_now], dim=2)
        z_now = torch.zeros(bsz, self.d, qlen, dtype=DT)
        deq_func = lambda z: self.func(z, z_hist, u_cat, pos)                   # noqa: E731
        z_out, info = self.deq(deq_func, z_now, sradius_mode=False, backward_writer=writer)
        z_now = z_out[-1]
        jac_loss = _sub(self.lib, "loss").jac_reg(deq_func(z_now), z_now) if compute_jac_loss else 0.0
        loss = _sub(self.lib, "loss").fp_correction(self.crit, (z_out, target), gamma=self.args.gamma)
        return loss, jac_loss, info


SEQ_ARGV = ["--norm_type", "weight_norm", "--ift", "--f_solver", "broyden", "--b_solver", "broyden",
            "--f_stop_mode", "rel", "--b_stop_mode", "rel", "--f_tol", "1e-3", "--b_tol", "1e-3",
            "--f_max_iter", "35", "--b_max_iter", "35", "--jac_loss_weight", "0.1", "--jac_loss_freq", "0.4"]


@pytest.mark.parametrize("jac", [True, False], ids=["deq_seq_ift_jr.sh", "deq_seq_ift.sh"])
def test_deq_seq(jac):
    g = torch.Generator().manual_seed(2)
    data, target = torch.randint(0, 11, (2, 5), generator=g), torch.randint(0, 11, (2, 5), generator=g)
    writes = {}

    def run(model, lib):
        writer = lambda info: writes.setdefault(lib.__name__, []).append(   # noqa: E731
            {k: info[k].detach().clone() for k in ("abs_lowest", "rel_lowest", "nstep")})
        loss, jac_loss, info = model(data, target, None, writer=writer, compute_jac_loss=jac)
        return loss + model.args.jac_loss_weight * jac_loss, info
    _compare(lambda lib, a: SeqLM(lib, a), run, SEQ_ARGV)
    assert len(writes["torchdeq"]) == len(writes["deq_fast.torchdeq"]) == 1
    for k, v in writes["torchdeq"][0].items():
        torch.testing.assert_close(writes["deq_fast.torchdeq"][0][k].to(DT), v.to(DT), rtol=1e-6,
                                   atol=1e-9, msg=k)


# --- IFT backward: TorchDEQ's solver statistics to the writer, its stop rule and Jacobian point --

TORCHDEQ_INFO_KEYS = {"abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius"}


class Tiny(nn.Module):
    """``z = tanh(0.6 W z + U x)``; ``scale`` sets the size of the incoming gradient."""

    def __init__(self, lib, args, d=6, scale=1.0):
        super().__init__()
        self.W, self.U, self.d, self.scale = nn.Linear(d, d), nn.Linear(3, d), d, scale
        self.deq = lib.get_deq(args)

    def forward(self, x, writer=None, solver_kwargs=None):
        u = self.U(x)
        z_out, info = self.deq(lambda z: torch.tanh(0.6 * self.W(z) + u),
                               torch.zeros(x.shape[0], self.d, dtype=x.dtype),
                               solver_kwargs=solver_kwargs, backward_writer=writer)
        return self.scale * sum(z.pow(2).sum() for z in z_out), info


def _writer_into(store, lib):
    def writer(info):
        store.setdefault(lib.__name__, []).append({k: v.detach().clone() if torch.is_tensor(v)
                                                   else v for k, v in info.items()})
    return writer


IFT_ARGV = {
    "sliced-fp": ["--ift", "--f_max_iter", "30", "--b_tol", "1e-4"],
    "sliced-hook-anderson": ["--hook_ift", "--f_solver", "anderson", "--b_solver", "anderson",
                             "--f_max_iter", "20", "--b_tol", "1e-5"],
    "sliced-nstates2-grad2": ["--ift", "--n_states", "2", "--grad", "2", "--f_max_iter", "12",
                              "--b_stop_mode", "rel", "--b_tol", "1e-3"],
    "indexing-broyden-nstates2": ["--ift", "--core", "indexing", "--f_solver", "broyden",
                                  "--b_solver", "broyden", "--n_states", "2", "--f_max_iter", "12",
                                  "--f_tol", "1e-14"],
    "indexing-hook-indexing": ["--hook_ift", "--core", "indexing", "--indexing", "3",
                               "--f_max_iter", "10", "--b_max_iter", "15", "--f_tol", "1e-14"],
    "sliced-f_max_iter0": ["--ift", "--f_max_iter", "0"],
    "indexing-f_max_iter0": ["--ift", "--core", "indexing", "--f_max_iter", "0"],
    "sliced-solver_kwargs0": ["--ift", "--f_max_iter", "20", "solver_kwargs0"],
}


@pytest.mark.parametrize("case", list(IFT_ARGV))
def test_ift_backward_matches_torchdeq(case):
    """Gradients, forward info and every backward-writer call as TorchDEQ's (``ift``/``hook_ift``,
    both cores, sampled states, ``f_max_iter=0``). The indexing cases use a tolerance the solve
    does not reach: TorchDEQ's indexing core drops the states after an early stop, and the IFT
    functor, zipped to the last one, is then not applied (as here)."""
    argv = [a for a in IFT_ARGV[case] if a != "solver_kwargs0"]
    skw = {"f_max_iter": 0} if "solver_kwargs0" in IFT_ARGV[case] else None
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    writes = {}
    _compare(lambda lib, a: Tiny(lib, a),
             lambda m, lib: m(x, writer=_writer_into(writes, lib), solver_kwargs=skw), argv)
    assert len(writes["torchdeq"]) == len(writes["deq_fast.torchdeq"]) == 1
    (ref,), (mine,) = writes["torchdeq"], writes["deq_fast.torchdeq"]
    assert TORCHDEQ_INFO_KEYS <= mine.keys()
    for k in TORCHDEQ_INFO_KEYS:
        torch.testing.assert_close(mine[k].to(DT), ref[k].to(DT), rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.parametrize("b_solver", ["fixed_point_iter", "anderson", "broyden"])
def test_ift_b_stop_mode_sets_backward_iterations_as_torchdeq(b_solver):
    """``b_stop_mode='rel'`` vs ``'abs'``: TorchDEQ's batch-max rule on the chosen residual
    decides the backward iteration count; with a large incoming gradient the relative residual
    is the smaller one and stops first."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    nsteps = {}
    for mode in ("abs", "rel"):
        argv = ["--ift", "--f_max_iter", "60", "--f_tol", "1e-10", "--b_solver", b_solver,
                "--b_stop_mode", mode, "--b_tol", "1e-4", "--b_max_iter", "60"]
        writes = {}
        _compare(lambda lib, a: Tiny(lib, a, scale=100.0),
                 lambda m, lib: m(x, writer=_writer_into(writes, lib)), argv)
        (ref,), (mine,) = writes["torchdeq"], writes["deq_fast.torchdeq"]
        assert TORCHDEQ_INFO_KEYS <= mine.keys()
        for k in ("nstep", "abs_lowest", "rel_lowest"):
            torch.testing.assert_close(mine[k].to(DT), ref[k].to(DT), rtol=1e-6, atol=1e-9, msg=k)
        torch.testing.assert_close(mine["abs_trace"].to(DT), ref["abs_trace"].to(DT), rtol=1e-6,
                                   atol=1e-9)
        nsteps[mode] = (ref["abs_trace"].shape[1], int(ref["nstep"].max()),
                        mine["abs_trace"].shape[1], int(mine["nstep"].max()))
        # TorchDEQ's rule: the batch stops once its largest residual of the mode is under b_tol
        assert float(mine[f"{mode}_lowest"].max()) < 1e-4
    assert nsteps["rel"][1] < nsteps["abs"][1], nsteps
    assert nsteps["rel"][3] < nsteps["abs"][3], nsteps


@pytest.mark.parametrize("hook_ift", [False, True], ids=["function", "hook"])
def test_backward_factory_ift_as_torchdeq(hook_ift):
    """``backward_factory('ift', ...)`` on its own: the same output, input gradient and writer
    statistics as TorchDEQ's functor with the same (TorchDEQ-contract) solver settings."""
    g = torch.Generator().manual_seed(11)
    W, u = 0.5 * torch.randn(5, 5, generator=g, dtype=DT), torch.randn(3, 5, generator=g, dtype=DT)
    res = {}
    for lib in (torchdeq, ours):
        Wl, ul = W.clone().requires_grad_(), u.clone().requires_grad_()
        func = _sub(lib, "utils.layer_utils").deq_decorator(
            lambda z: torch.tanh(z @ Wl.T + ul), torch.zeros(3, 5, dtype=DT))[0]
        with torch.no_grad():
            z_star = lib.solver.get_solver("anderson")(func, torch.zeros(3, 5, dtype=DT),
                                                       max_iter=30, tol=1e-12)[0]
        trainer = nn.Module()
        trainer.hook = None
        produce = _sub(lib, "grad").backward_factory(
            "ift", hook_ift=hook_ift, b_solver=lib.solver.get_solver("fixed_point_iter"),
            b_solver_kwargs=dict(max_iter=50, tol=1e-3, stop_mode="rel"))
        infos = []
        (out,) = produce(trainer, func, z_star.detach(), writer=infos.append)
        (3.0 * out.pow(2).sum()).backward()
        res[lib.__name__] = out.detach(), Wl.grad, ul.grad, infos
    (o_r, gw_r, gu_r, i_r), (o_m, gw_m, gu_m, i_m) = res["torchdeq"], res["deq_fast.torchdeq"]
    torch.testing.assert_close(o_m, o_r)
    torch.testing.assert_close(gw_m, gw_r, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gu_m, gu_r, rtol=1e-9, atol=1e-12)
    assert len(i_r) == len(i_m) == 1 and TORCHDEQ_INFO_KEYS <= i_m[0].keys()
    for k in TORCHDEQ_INFO_KEYS:
        torch.testing.assert_close(i_m[0][k].to(DT), i_r[0][k].to(DT), rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
@pytest.mark.parametrize("f_tol", [1e-12, 0.5], ids=["no-early-stop", "early-stop"])
def test_indexing_core_samples_the_states_torchdeq_samples(solver, f_tol):
    """core='indexing' with a phantom gradient returns the solver states TorchDEQ samples (Broyden
    samples at step+1, as TorchDEQ's does) and, after an early stop, as many as TorchDEQ."""
    import deq_fast.torchdeq as fast_tq

    torch.manual_seed(0)
    W = 0.3 * torch.randn(6, 6, dtype=torch.float64) / 6 ** 0.5
    x = torch.randn(3, 6, dtype=torch.float64)
    outs = []
    for lib in (torchdeq, fast_tq):
        deq = lib.get_deq(core="indexing", n_states=2, f_solver=solver, f_max_iter=6, f_tol=f_tol)
        deq.train()
        z_out, _ = deq(lambda z: torch.tanh(z @ W + x), torch.zeros(3, 6, dtype=torch.float64))
        outs.append([z.detach() for z in z_out])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "norm_clip"])
def test_spectral_norm_gives_torchdeq_weights(clip):
    """``--norm_type spectral_norm`` (IGNN's run script, MDEQ's option): the same u, v draws, no
    power step at apply, one (v then u) per reset_norm: the same weights step after step."""
    import torchdeq.norm as tq_norm

    import deq_fast.torchdeq.norm as fast_norm

    weights = []
    for lib in (tq_norm, fast_norm):
        torch.manual_seed(0)
        layer = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Conv2d(3, 4, 3))
        torch.manual_seed(1)
        lib.apply_norm(layer, "spectral_norm", clip=clip, clip_value=0.5)
        got = []
        for _ in range(3):
            lib.reset_norm(layer)
            got.append([layer[0].weight.detach().clone(), layer[1].weight.detach().clone()])
            with torch.no_grad():
                layer[0].weight_orig.mul_(1.1)
        weights.append(got)
    for step_tq, step_fast in zip(*weights):
        for a, b in zip(step_tq, step_fast):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_spectral_norm_keeps_torchdeq_aliasing_until_the_first_reset():
    """MDEQ initialises ``module.weight`` in place after apply_norm; with TorchDEQ's spectral norm
    that write reaches the parameter (``weight`` is its raw data until the first reset)."""
    import torchdeq.norm as tq_norm

    import deq_fast.torchdeq.norm as fast_norm

    origs = []
    for lib in (tq_norm, fast_norm):
        torch.manual_seed(0)
        layer = torch.nn.Conv2d(3, 4, 3)
        lib.apply_norm(layer, "spectral_norm")
        with torch.no_grad():
            layer.weight.normal_(0, 0.01)        # a model's own init after apply_norm
        origs.append(layer.weight_orig.detach().clone())
    torch.testing.assert_close(origs[1], origs[0], rtol=0, atol=0)
