"""The fused C++ CPU ops at MDEQ-large state size, against the pure-torch path where one exists.

Per op: milliseconds per call (median of ``--reps`` after one warm-up, one torch thread) and the
bandwidth it reaches from the bytes it must move (history columns read + state vectors read and
written). For scale, the same machine's ``copy_`` of one state is printed first.

* forward Broyden, ``B x L x D`` rings with ``n`` written columns: ``deq_fast::broyden_dots`` /
  ``broyden_update`` (their C++ CPU kernels) against ``broyden_dots_reference`` /
  ``broyden_update_reference`` (the torch path: bmm/baddbmm and elementwise ops);
* backward solve updates, ``[n, B, D]`` histories: ``bwd_broyden_step``, ``bwd_anderson_mix``,
  ``bwd_gmres_update`` (no torch counterpart: the Python reference loop is an oracle, not a path).

Run::

    python benchmarks/bench_cpu_ops.py                  # B=32, D=61440 (mdeq-large), n=10
    python benchmarks/bench_cpu_ops.py --B 32 --D 30720 --n 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from deq_fast.ops import extension
from deq_fast.ops.broyden import broyden_dots_reference, broyden_update_reference


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--D", type=int, default=61440)
    p.add_argument("--n", type=int, default=10, help="written history columns")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    if extension.load() is None:
        print("deq_fast._C is not built:", extension.extension_status()[1])
        return 1
    torch.set_num_threads(1)
    B, D, n = args.B, args.D, args.n
    L = n + 2
    MB = B * D * 4 / 2**20                     # one fp32 state
    ops = torch.ops.deq_fast
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    x, fx, dx, r, rp = (rnd(B, D) for _ in range(5))
    print(f"B={B} D={D} n={n} fp32, one thread; one state = {MB:.1f} MB")
    rows = [("copy_ (one state)", timed(lambda: rp.copy_(r), args.reps), 2)]

    # forward Broyden: [B, L, D] rings, n written
    U, V = torch.zeros(B, L, D), torch.zeros(B, L, D)
    U[:, :n], V[:, :n] = rnd(B, n, D, scale=0.1), rnd(B, n, D, scale=0.1)
    g, g_old, abc, scal = torch.empty(B, D), rnd(B, D), torch.zeros(B, 3, L), torch.zeros(B, 4)
    best = x.clone()
    flags = torch.ones(B, dtype=torch.bool)
    ops.broyden_dots.default(x, fx, g_old, g, dx, U, V, abc, scal, n)
    cache: dict = {}
    dots_bytes = 2 * n + 5          # read x, fx, g_old, dx, n rows of U and V; write g
    rows.append(("fwd broyden_dots  torch", timed(
        lambda: broyden_dots_reference(x, fx, g_old, g, dx, U, V, abc, scal, n, cache=cache),
        args.reps),
        dots_bytes))
    rows.append(("fwd broyden_dots  C++", timed(
        lambda: ops.broyden_dots.default(x, fx, g_old, g, dx, U, V, abc, scal, n), args.reps),
        dots_bytes))
    # the update mutates x, dx, U, V: time it on copies so every call sees the same state
    Us, Vs, xs, dxs = U.clone(), V.clone(), x.clone(), dx.clone()

    def reset():
        Us.copy_(U), Vs.copy_(V), xs.copy_(x), dxs.copy_(dx)

    upd_bytes = 2 * n + 8            # read x, g, g_old, dx, n rows of U and V; write u, v, dx, x

    def ref_update():
        broyden_update_reference(xs, g, g_old, dxs, Us, Vs, abc, scal, best, flags, flags, n, n,
                                 cache=cache)

    def cpp_update():
        ops.broyden_update.default(xs, g, g_old, dxs, Us, Vs, abc, scal, best, flags, flags, n, n)

    t_reset = timed(reset, args.reps)
    rows.append(("fwd broyden_update torch", timed(lambda: (reset(), ref_update()), args.reps)
                 - t_reset, upd_bytes))
    rows.append(("fwd broyden_update C++", timed(lambda: (reset(), cpp_update()), args.reps)
                 - t_reset, upd_bytes))

    # backward histories [n, B, D]
    Ub, Vb = rnd(n + 1, B, D, scale=1e-3), rnd(n + 1, B, D, scale=1e-3)
    Ubs, Vbs, xb, pb, db = Ub.clone(), Vb.clone(), x.clone(), rp.clone(), dx.clone()

    def breset():
        Ubs.copy_(Ub), Vbs.copy_(Vb), xb.copy_(x), pb.copy_(rp), db.copy_(dx)

    t_breset = timed(breset, args.reps)
    rows.append(("bwd broyden_step (update)", timed(
        lambda: (breset(), ops.bwd_broyden_step(xb, r, pb, db, Ubs, Vbs, flags, n, n)),
        args.reps) - t_breset, 4 * n + 8))
    m = 5
    F, G = rnd(m, B, D), rnd(m, B, D)
    gram = torch.zeros(B, m, m, dtype=torch.float64)
    rows.append(("bwd anderson_mix (m=5)", timed(
        lambda: ops.bwd_anderson_mix(xb, r, F, G, gram, flags, 2, m, 1e-4), args.reps),
        2 * m + 4))
    Q = rnd(n + 1, B, D)
    R = torch.rand(B, n, n + 1, dtype=torch.float64) + 5 * torch.eye(n, n + 1, dtype=torch.float64)
    s = torch.rand(B, n + 1, dtype=torch.float64)
    kd = torch.full((B,), n, dtype=torch.long)
    rows.append(("bwd gmres_update", timed(lambda: ops.bwd_gmres_update(xb, Q, R, s, kd),
                                           args.reps), n + 2))

    print(f"{'op':28s} {'ms/call':>8s} {'GB/s':>6s}   (bytes: states moved x one state)")
    for name, ms, states in rows:
        print(f"{name:28s} {ms:8.2f} {states * MB * 2**20 / ms / 1e6:6.1f}   ({states} states)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
