"""Every Triton kernel compiles ahead of time for real GPUs (sm_80, sm_90) on this CPU machine.

The interpreter (tests/test_kernels.py) is more lenient than the GPU compiler (shapes, dtype
mixing, math that exists only for some dtypes), so each kernel is also lowered all the way to
PTX and a cubin with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
every state dtype, with the block sizes and warp counts the launchers pick for a typical problem.

The compiles run in one subprocess without ``TRITON_INTERPRET``: once ``triton`` has been
imported under the interpreter (conftest.py sets it for the kernel tests) its own library
functions (``tl.sum``, ...) are interpreter objects that the compiler rejects. The subprocess uses
a fresh Triton cache, so a cached result from an older source cannot pass.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton  # noqa: F401  (a declared test dependency: imported, never skipped)

pytestmark = pytest.mark.slow   # one ahead-of-time compile of every kernel variant: ~25 s

ARCHS = (80, 90)
STATE_TYPES = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "fp64": "fp64"}  # state -> acc
OPS = ("anderson_residual", "anderson_mix", "broyden_dots", "broyden_update", "residual_norms",
       "fixed_point_advance", "track_status")
# track_status has no state-dtype pointer: only its float32/float64 accumulator variants
CASES = [(op, state) for op in OPS for state in STATE_TYPES
         if not (op == "track_status" and state in ("bf16", "fp16"))]

# pointer arguments by role (every kernel names its pointers *_ptr)
ACC_PTRS = {"gram_ptr", "sq_ptr", "abc_ptr", "scal_ptr", "lowest_ptr", "best_step_ptr", "trace_ptr",
            "part_ptr"}
BOOL_PTRS = {"improved_ptr", "active_ptr"}
INT_PTRS = {"ticket_ptr"}
FLOAT_ARGS = {"lam", "beta", "step", "tol", "rel_eps", "tau"}
BOOL_ARGS = {"scaled", "keep_f", "whole_batch", "stop_together", "always_update"}


def signature(arg_names, state: str, acc: str, constexprs: dict) -> dict:
    """Triton signature of a kernel from its argument names."""
    sig = {}
    for name in arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ("i1" if name in BOOL_PTRS else "i32" if name in INT_PTRS
                               else acc if name in ACC_PTRS else state)
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name in BOOL_ARGS:
            sig[name] = "i1"
        else:
            sig[name] = "i32"
    return sig


def compile_all() -> dict:
    """Compile every case (runs in the subprocess); returns ``{case id: facts or error}``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import deq_fast.kernels as K
    from deq_fast.kernels import anderson, broyden, fixed_point

    # a typical problem: D = 4096, Anderson m = 6, Broyden L = 30, B = 256 (fp32 plans, H100)
    am, br, fp = (anderson.launch_plan(256, 4096, 6, 4, 132),
                  broyden.launch_plan(256, 4096, 30, 4, 132), fixed_point.launch_plan(256, 4096, 4, 132))
    configs = {
        "anderson_residual": (dict(M_PAD=am.ROWS_PAD, BLOCK_D=am.BLOCK_D), am.num_warps),
        "anderson_mix": (dict(M_PAD=am.ROWS_PAD, BLOCK_D=am.BLOCK_D), am.num_warps),
        "broyden_dots": (dict(L_PAD=br.ROWS_PAD, BLOCK_D=br.BLOCK_D), br.num_warps),
        "broyden_update": (dict(L_PAD=br.ROWS_PAD, BLOCK_D=br.BLOCK_D), br.num_warps),
        "residual_norms": (dict(DAMPED=True, BLOCK_D=fp.BLOCK_D), fp.num_warps),
        "fixed_point_advance": (dict(DAMPED=True, BLOCK_D=fp.BLOCK_D), fp.num_warps),
        "track_status": (dict(BLOCK_B=256), 4),
    }
    assert set(configs) == set(K.KERNELS) == set(OPS)
    results = {}
    for op, state in CASES:
        fn = K.KERNELS[op]
        constexprs, num_warps = configs[op]
        for arch in ARCHS:
            key = f"{op}-{state}-sm{arch}"
            try:
                src = ASTSource(fn=fn, signature=signature(fn.arg_names, state, STATE_TYPES[state],
                                                           constexprs), constexprs=constexprs)
                out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                     options={"num_warps": num_warps})
                ptx = out.asm.get("ptx", "")
                cubin = out.asm.get("cubin", b"")
                results[key] = {"asm": sorted(out.asm), "target": f".target sm_{arch}" in ptx,
                                "entry": f".entry {fn.__name__}" in ptx,
                                "cubin_bytes": len(cubin) if isinstance(cubin, bytes) else -1}
            except Exception as exc:  # reported per case by the test
                results[key] = {"error": f"{type(exc).__name__}: {exc}"[-3000:]}
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    out_file = tmp_path_factory.mktemp("aot") / "results.json"
    proc = subprocess.run([sys.executable, __file__, str(out_file)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out_file.read_text())


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("op,state", CASES, ids=[f"{o}-{s}" for o, s in CASES])
def test_compiles(compiled, op, state, arch):
    res = compiled[f"{op}-{state}-sm{arch}"]
    assert "error" not in res, res.get("error")
    assert "ptx" in res["asm"] and "cubin" in res["asm"]
    assert res["target"] and res["entry"]
    assert res["cubin_bytes"] > 1000


if __name__ == "__main__":          # the compile subprocess: python test_aot_compile.py OUT.json
    with open(sys.argv[1], "w") as fh:
        json.dump(compile_all(), fh)
