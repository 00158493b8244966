"""locuslab/deq's clients (DEQ-Sequence, MDEQ-Vision) with only the solver import changed.

Two tiny self-made models reproduce how those projects call ``anderson``/``broyden``:

- a DEQ-transformer-like block on a ``(B, d, L)`` state with a memory of past segments: forward
  ``solver(lambda z: func(z, *func_args), z1s, threshold=f_thres, stop_mode=...)`` under
  ``no_grad``, then one more ``func`` call with ``z1s.requires_grad_()`` and a tensor hook on its
  output that removes itself and solves the backward system with
  ``solver(lambda y: autograd.grad(new_z1s, z1s, y, retain_graph=True)[0] + grad,
  torch.zeros_like(grad), threshold=b_thres)`` (DEQ-Sequence passes no ``stop_mode`` there);
- an MDEQ-like multiscale cell whose list of scales is packed into one ``(B, sum C·H·W, 1)`` state
  (concatenate the per-scale ``reshape(B, -1, 1)``; unpack with slices and ``.view``), solved with
  ``name="forward"``/``name="backward"`` and ``stop_mode`` on both passes, as MDEQ-Vision does.

Each is run with deq_fast's solvers and with the locuslab-formula oracle of ``test_locuslab.py``
(which evaluates ``f`` exactly where the original does): forward results, ``nstep``, traces and
the parameter gradients through the hook agree within 1e-9 in float64, and deq_fast makes no more
``f`` evaluations (forward maps and backward VJPs) than the oracle.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

import deq_fast

_spec = importlib.util.spec_from_file_location(
    "_locuslab_oracle", pathlib.Path(__file__).with_name("test_locuslab.py"))
_oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_oracle)

DT = torch.float64
TOL = 1e-9


def _oracle_anderson(f, x0, name="unknown", **kw):     # the original takes **kwargs (name=...)
    return _oracle.oracle_anderson(f, x0, **kw)


def _oracle_broyden(f, x0, threshold, eps=1e-3, stop_mode="rel", ls=False, name="unknown"):
    return _oracle.oracle_broyden(f, x0, threshold, eps=eps, stop_mode=stop_mode, ls=ls)


ORACLE = {"anderson": _oracle_anderson, "broyden": _oracle_broyden}
OURS = {"anderson": deq_fast.anderson, "broyden": deq_fast.broyden}


class Recorder:
    """Wraps a solver: keeps each call's result dict and counts the evaluations of its ``f``."""

    def __init__(self, solver):
        self.solver, self.calls = solver, []

    def __call__(self, f, x0, *args, **kwargs):
        rec = {"evals": 0, "kwargs": dict(kwargs)}

        def counted(z):
            rec["evals"] += 1
            return f(z)
        rec["out"] = self.solver(counted, x0, *args, **kwargs)
        self.calls.append(rec)
        return rec["out"]


# --- DEQ-Sequence: a transformer-like block on (B, d, L) with memory --------------------------

class SeqCell(nn.Module):
    """Causal attention over [memory, z] with the injection added to the q/k/v projections, then a
    position-wise feed-forward layer; 1x1 convolutions on (B, d, L) like DEQ-Sequence's."""

    def __init__(self, d=6, d_inner=10):
        super().__init__()
        self.qkv = nn.Conv1d(d, 3 * d, 1, bias=False)
        self.ff1, self.ff2 = nn.Conv1d(d, d_inner, 1), nn.Conv1d(d_inner, d, 1)
        self.ln = nn.GroupNorm(1, d)
        with torch.no_grad():
            for conv in (self.qkv, self.ff1, self.ff2):
                conv.weight.mul_(0.5)
        self.d = d

    def forward(self, z, u, mem, pos):
        qlen, mlen = z.shape[2], mem.shape[2]
        cat = torch.cat([mem, z], dim=2)
        q, k, v = torch.chunk(self.qkv(cat) + u, 3, dim=1)
        q = q[:, :, -qlen:] + pos[:, :, -qlen:]
        score = torch.einsum("bdi,bdj->bij", q, k) / self.d ** 0.5
        mask = torch.triu(torch.ones(qlen, mlen + qlen, dtype=torch.bool), diagonal=1 + mlen)
        attn = F.softmax(score.masked_fill(mask[None], -float("inf")), dim=-1)
        h = self.ln(0.5 * torch.einsum("bij,bdj->bdi", attn, v) + z)
        return torch.tanh(0.5 * self.ff2(torch.relu(self.ff1(h))) + 0.5 * h)


class SeqModel(nn.Module):
    def __init__(self, f_solver, b_solver, stop_mode="rel", d=6, vocab=11, mem_len=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.inject = nn.Conv1d(d, 3 * d, 1)
        self.func = SeqCell(d)
        self.out = nn.Linear(d, vocab)
        self.f_solver, self.b_solver = f_solver, b_solver or f_solver
        self.stop_mode, self.mem_len, self.d = stop_mode, mem_len, d
        self.hook = None

    def forward(self, data, target, mems, f_thres=30, b_thres=40):
        bsz, qlen = data.shape
        u_now = self.inject(self.emb(data).transpose(1, 2))                 # (B, 3d, L)
        z0, u0 = mems if mems else (torch.zeros(bsz, self.d, 0, dtype=DT),
                                    torch.zeros(bsz, 3 * self.d, 0, dtype=DT))
        mlen = z0.shape[2]
        us = torch.cat([u0, u_now], dim=2)
        pos = torch.sin(torch.arange(mlen + qlen - 1, -1, -1.0, dtype=DT) / 3)[None, None]
        z1s = torch.zeros(bsz, self.d, qlen, dtype=DT)
        func_args = [us, z0, pos]
        with torch.no_grad():
            result = self.f_solver(lambda z: self.func(z, *func_args), z1s, threshold=f_thres,
                                   stop_mode=self.stop_mode)
            z1s = result["result"]
        new_z1s = z1s
        if self.training:
            z1s.requires_grad_()
            new_z1s = self.func(z1s, *func_args)

            def backward_hook(grad):
                if self.hook is not None:
                    self.hook.remove()          # to avoid an infinite loop (the original's dance)
                new_grad = self.b_solver(lambda y: autograd.grad(new_z1s, z1s, y, retain_graph=True)[0]
                                         + grad, torch.zeros_like(grad), threshold=b_thres)["result"]
                return new_grad
            self.hook = new_z1s.register_hook(backward_hook)
        logits = self.out(new_z1s.permute(2, 0, 1))                          # (L, B, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.t().reshape(-1))
        with torch.no_grad():                                               # _update_mems
            end = mlen + qlen
            beg = max(0, end - self.mem_len)
            new_mems = [torch.cat([z0, new_z1s], 2)[:, :, beg:end].detach(), us[:, :, beg:end].detach()]
        return loss, new_mems


def _run_seq(solvers, stop_mode, f_thres, b_thres, segments=2):
    torch.manual_seed(0)
    f_rec, b_rec = Recorder(solvers[0]), Recorder(solvers[1])
    model = SeqModel(f_rec, b_rec, stop_mode=stop_mode).to(DT).train()
    g = torch.Generator().manual_seed(3)
    mems, grads, fwd = None, [], []
    for _ in range(segments):                     # a second segment attends to the first's memory
        data = torch.randint(0, 11, (2, 5), generator=g)
        target = torch.randint(0, 11, (2, 5), generator=g)
        model.zero_grad()
        loss, mems = model(data, target, mems, f_thres=f_thres, b_thres=b_thres)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        fwd.append(loss.detach())
    return f_rec, b_rec, grads, fwd


def _assert_same_solves(ours: Recorder, ref: Recorder, atol=TOL):
    assert len(ours.calls) == len(ref.calls) > 0
    for mine, theirs in zip(ours.calls, ref.calls):
        assert mine["kwargs"] == theirs["kwargs"]
        _oracle.assert_same_dict(mine["out"], theirs["out"], atol=atol)
        if theirs["out"]["lowest"] < theirs["out"]["eps"]:       # converged: no extra evaluations
            assert mine["evals"] <= theirs["evals"], (mine["evals"], theirs["evals"])


def _assert_same_grads(ours, ref):
    for g_m, g_r in zip(ours, ref):
        assert g_m.keys() == g_r.keys()
        for name in g_r:
            torch.testing.assert_close(g_m[name], g_r[name], rtol=TOL, atol=TOL, msg=name)


SEQ_CASES = {
    # train_transformer.py's defaults: Anderson forward, Broyden backward, relative stop
    "anderson-broyden-rel": (("anderson", "broyden"), "rel", 30, 40),
    "broyden-broyden-rel": (("broyden", "broyden"), "rel", 30, 40),
    "anderson-anderson-abs": (("anderson", "anderson"), "abs", 30, 40),
    "broyden-capped": (("broyden", "broyden"), "rel", 6, 8),        # iteration caps bind
}


@pytest.mark.parametrize("case", list(SEQ_CASES))
def test_deq_sequence_pattern(case):
    (fs, bs), stop_mode, f_thres, b_thres = SEQ_CASES[case]
    ours = _run_seq((OURS[fs], OURS[bs]), stop_mode, f_thres, b_thres)
    ref = _run_seq((ORACLE[fs], ORACLE[bs]), stop_mode, f_thres, b_thres)
    _assert_same_solves(ours[0], ref[0])
    _assert_same_solves(ours[1], ref[1])
    for lo, lr in zip(ours[3], ref[3]):
        torch.testing.assert_close(lo, lr, rtol=TOL, atol=TOL)
    _assert_same_grads(ours[2], ref[2])
    assert len(ref[1].calls) == 2, "the hook fires once per backward (it removes itself)"


# --- MDEQ-Vision: a multiscale cell on a packed list of scales ---------------------------------

def list2vec(z_list):
    bsz = z_list[0].size(0)
    return torch.cat([z.reshape(bsz, -1, 1) for z in z_list], dim=1)


def vec2list(z, cutoffs):
    bsz, out, start = z.shape[0], [], 0
    for c, h, w in cutoffs:
        out.append(z[:, start:start + c * h * w].view(bsz, c, h, w))
        start += c * h * w
    return out


class Branch(nn.Module):
    """A residual block (conv, GroupNorm, ReLU, conv, GroupNorm) plus the injection."""

    def __init__(self, c, groups=2):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2 * c, c, 3, padding=1, bias=False)
        self.gn1, self.gn2 = nn.GroupNorm(groups, 2 * c), nn.GroupNorm(groups, c)

    def forward(self, z, injection):
        y = self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(z)))))
        return torch.relu(0.2 * y + injection + 0.2 * z)


class MultiscaleStage(nn.Module):
    """Two branches (full and half resolution), per-branch residual blocks, then fusion: a strided
    convolution down and a 1x1 convolution plus upsampling up, summed, ReLU and GroupNorm."""

    def __init__(self, channels=(4, 6)):
        super().__init__()
        c0, c1 = channels
        self.branches = nn.ModuleList([Branch(c0), Branch(c1)])
        self.down = nn.Conv2d(c0, c1, 3, stride=2, padding=1, bias=False)
        self.up = nn.Conv2d(c1, c0, 1, bias=False)
        self.post = nn.ModuleList([nn.GroupNorm(2, c0), nn.GroupNorm(2, c1)])

    def forward(self, z_list, x_list):
        y0, y1 = (b(z, x) for b, z, x in zip(self.branches, z_list, x_list))
        f0 = y0 + 0.2 * F.interpolate(self.up(y1), scale_factor=2, mode="nearest")
        f1 = 0.2 * y1 + self.down(y0)
        return [self.post[0](torch.relu(f0)), self.post[1](torch.relu(f1))]


class MDEQCore(nn.Module):
    def __init__(self, f_solver, b_solver, stop_mode="rel", f_thres=18, b_thres=20, channels=(4, 6)):
        super().__init__()
        self.stem = nn.Conv2d(3, channels[0], 3, padding=1)
        self.fullstage = MultiscaleStage(channels)
        self.head = nn.Linear(sum(channels), 5)
        self.f_solver, self.b_solver = f_solver, b_solver
        self.stop_mode, self.f_thres, self.b_thres, self.channels = stop_mode, f_thres, b_thres, channels
        self.hook = None

    def forward(self, x, **kwargs):
        f_thres = kwargs.get("f_thres", self.f_thres)
        b_thres = kwargs.get("b_thres", self.b_thres)
        x_list = [self.stem(x)]
        bsz, _, H, W = x_list[-1].shape
        x_list.append(torch.zeros(bsz, self.channels[1], H // 2, W // 2, dtype=x.dtype))
        z_list = [torch.zeros_like(e) for e in x_list]
        z1 = list2vec(z_list)
        cutoffs = [(e.size(1), e.size(2), e.size(3)) for e in z_list]
        func = lambda z: list2vec(self.fullstage(vec2list(z, cutoffs), x_list))   # noqa: E731
        with torch.no_grad():
            result = self.f_solver(func, z1, threshold=f_thres, stop_mode=self.stop_mode, name="forward")
            z1 = result["result"]
        new_z1 = z1
        if self.training:
            new_z1 = func(z1.requires_grad_())

            def backward_hook(grad):
                if self.hook is not None:
                    self.hook.remove()
                result = self.b_solver(lambda y: autograd.grad(new_z1, z1, y, retain_graph=True)[0] + grad,
                                       torch.zeros_like(grad), threshold=b_thres, stop_mode=self.stop_mode,
                                       name="backward")
                return result["result"]
            self.hook = new_z1.register_hook(backward_hook)
        y_list = vec2list(new_z1, cutoffs)
        feats = torch.cat([y.mean((2, 3)) for y in y_list], dim=1)
        return self.head(feats)


def _run_mdeq(solvers, stop_mode, f_thres, b_thres, steps=2):
    torch.manual_seed(0)
    f_rec, b_rec = Recorder(solvers[0]), Recorder(solvers[1])
    model = MDEQCore(f_rec, b_rec, stop_mode=stop_mode, f_thres=f_thres, b_thres=b_thres).to(DT).train()
    g = torch.Generator().manual_seed(5)
    grads, fwd = [], []
    for _ in range(steps):                                    # a fresh hook per training step
        x = torch.randn(2, 3, 4, 4, generator=g, dtype=DT)
        y = torch.randint(0, 5, (2,), generator=g)
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        fwd.append(loss.detach())
    return f_rec, b_rec, grads, fwd


MDEQ_CASES = {
    # cls_mdeq_TINY.yaml: Broyden both ways, relative stop, 18 / 20
    "tiny-config": (("broyden", "broyden"), "rel", 18, 20),
    "default-config-abs": (("broyden", "broyden"), "abs", 30, 40),   # lib/config/default.py
    "anderson": (("anderson", "anderson"), "rel", 18, 20),
    "broyden-ls": (("broyden-ls", "broyden-ls"), "rel", 18, 20),      # broyden(..., ls=True)
}


def _solver(table, key):
    return functools.partial(table["broyden"], ls=True) if key == "broyden-ls" else table[key]


@pytest.mark.parametrize("case", list(MDEQ_CASES))
def test_mdeq_vision_pattern(case):
    (fs, bs), stop_mode, f_thres, b_thres = MDEQ_CASES[case]
    ours = _run_mdeq((_solver(OURS, fs), _solver(OURS, bs)), stop_mode, f_thres, b_thres)
    ref = _run_mdeq((_solver(ORACLE, fs), _solver(ORACLE, bs)), stop_mode, f_thres, b_thres)
    _assert_same_solves(ours[0], ref[0])
    _assert_same_solves(ours[1], ref[1])
    for lo, lr in zip(ours[3], ref[3]):
        torch.testing.assert_close(lo, lr, rtol=TOL, atol=TOL)
    _assert_same_grads(ours[2], ref[2])
    assert len(ref[1].calls) == 2


def test_mdeq_packed_state_reaches_f_as_packed():
    """MDEQ unpacks with slices and ``.view``: the state handed to ``f`` must keep x0's shape and
    allow that view (deq_fast may not hand over a differently strided buffer)."""
    seen = []
    stage = MultiscaleStage().to(DT)
    x_list = [torch.randn(1, 4, 4, 4, dtype=DT), torch.zeros(1, 6, 2, 2, dtype=DT)]
    cutoffs = [(4, 4, 4), (6, 2, 2)]

    def func(z):
        seen.append(tuple(z.shape))
        return list2vec(stage(vec2list(z, cutoffs), x_list))
    z1 = list2vec([torch.zeros_like(e) for e in x_list])
    for solver in (deq_fast.anderson, deq_fast.broyden):
        with torch.no_grad():
            solver(func, z1, threshold=5, stop_mode="rel", name="forward")
    assert set(seen) == {tuple(z1.shape)}
