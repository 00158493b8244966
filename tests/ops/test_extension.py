"""The compiled extension deq_fast._C: discovery, op registration, PT2 compliance, C++ argument
checks, the pure-Python fallback, and that the CUDA sources compile for sm_80 and sm_90."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deq_fast
from deq_fast.ops import extension
from deq_fast.ops.lstsq import OP_NAME, anderson_lstsq, anderson_lstsq_reference

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"

# Tests of the built module run unless the run explicitly opted out of the extension; a missing
# build is a failure, not a skip (CI installs with `pip install --no-build-isolation -e .`).
needs_ext = pytest.mark.skipif(os.environ.get("DEQ_FAST_NO_EXT") == "1",
                               reason="DEQ_FAST_NO_EXT=1: the extension is deliberately not used")


def _gram(batch: int, m: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, m, 13, generator=gen, dtype=dtype)
    return (g @ g.transpose(1, 2)).contiguous()


@needs_ext
def test_extension_is_built_and_loaded():
    ok, msg = deq_fast.extension_status()
    assert ok, msg
    assert "deq_fast._C loaded from" in msg
    assert extension.load() is extension.load()
    assert OP_NAME in torch._C._dispatch_get_all_op_names()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CPU")


@needs_ext
def test_status_reports_env_opt_out(monkeypatch):
    monkeypatch.setenv("DEQ_FAST_NO_EXT", "1")
    ok, msg = deq_fast.extension_status()
    assert not ok and "DEQ_FAST_NO_EXT=1" in msg


def test_import_and_reference_path_without_extension():
    """`import deq_fast` works when deq_fast._C cannot be imported: clear message, reference path."""
    script = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "deq_fast._C":
                    raise ImportError("simulated missing build")
        sys.meta_path.insert(0, Block())
        import torch, deq_fast
        from deq_fast.ops.lstsq import anderson_lstsq, anderson_lstsq_reference
        ok, msg = deq_fast.extension_status()
        assert not ok, msg
        assert "not built (ImportError: simulated missing build)" in msg, msg
        assert "pip install --no-build-isolation -e ." in msg, msg
        g = torch.randn(3, 4, 9); gram = g @ g.transpose(1, 2)
        a = anderson_lstsq(gram, 4, 1)
        torch.testing.assert_close(a, anderson_lstsq_reference(gram, 4, 1, 1e-4, True))
        # the solver ops exist without the extension, with the reference as their CPU kernel
        from deq_fast.ops.dispatch import get_ops
        from deq_fast.ops.table import REFERENCE
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("deq_fast::broyden_dots", "CPU")
        x, fx, sq = torch.randn(2, 5), torch.randn(2, 5), torch.empty(2, 2)
        flags = torch.ones(2, dtype=torch.bool)
        torch.ops.deq_fast.fixed_point_step(x.clone(), fx, torch.zeros(2, 5), sq, flags, flags)
        torch.testing.assert_close(sq[:, 0], (fx - x).square().sum(1))
        B, L, D = 2, 3, 5
        g, abc, scal = torch.empty(B, D), torch.zeros(B, 3, L), torch.empty(B, 4)
        torch.ops.deq_fast.broyden_dots(x, fx, torch.zeros(B, D), g, x, torch.zeros(B, L, D),
                                        torch.zeros(B, L, D), abc, scal, 0)
        torch.testing.assert_close(g, fx - x)
        ops = get_ops("cpp", torch.device("cpu"), torch.float32)
        assert ops.broyden_dots.func is REFERENCE.broyden_dots
        print("OK", msg)
    """)
    env = {k: v for k, v in os.environ.items() if k != "DEQ_FAST_NO_EXT"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK deq_fast._C not built")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of the C++ op."""
    for args in [(_gram(3, 5, dtype), 4, 2, 1e-3, True), (_gram(1, 1, dtype), 1, 0, 0.0, False)]:
        torch.library.opcheck(torch.ops.deq_fast.anderson_lstsq.default, args)


@needs_ext
def test_torch_compile_fullgraph():
    """The fake kernel lets torch.compile trace the op (and the public wrapper) without graph breaks."""
    gram = _gram(3, 5, torch.float32, seed=1)

    def step(g: torch.Tensor) -> torch.Tensor:
        alpha = anderson_lstsq(g, 4, 3, 1e-3, True)
        return torch.ops.deq_fast.anderson_lstsq(g, 5, 0, 1e-2, False) + 2 * alpha

    expected = (anderson_lstsq_reference(gram, 5, 0, 1e-2, False)
                + 2 * anderson_lstsq_reference(gram, 4, 3, 1e-3, True))
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(gram)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("make,match", [
    (lambda: (_gram(2, 5)[0], 3, 1), "gram must have shape"),
    (lambda: (torch.zeros(2, 5, 4), 3, 1), "gram must have shape"),
    (lambda: (torch.zeros(2, 5, 5, dtype=torch.int32), 3, 1), "gram must be float32 or float64"),
    (lambda: (torch.zeros(2, 5, 5, dtype=torch.float16), 3, 1), "gram must be float32 or float64"),
    (lambda: (torch.zeros(5, 2, 5).transpose(0, 1)[:, :, :], 3, 1), "gram must be contiguous"),
    (lambda: (torch.zeros(1, 17, 17), 3, 1), "history size m must be <= 16"),
    (lambda: (_gram(2, 5), 0, 0), "n must satisfy"),
    (lambda: (_gram(2, 5), 6, 0), "n must satisfy"),
    (lambda: (_gram(2, 5), 3, 3), "newest must satisfy"),
    (lambda: (_gram(2, 5), 3, -1), "newest must satisfy"),
], ids=["dim", "not-square", "int32", "fp16", "non-contiguous", "m>16", "n=0", "n>m",
        "newest=n", "newest<0"])
def test_op_rejects_bad_arguments(make, match):
    gram, n, newest = make()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.deq_fast.anderson_lstsq(gram, n, newest, 1e-4, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the C++ CUDA kernels "
                    "cannot run here (their sources are compiled by the nvcc test below)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_cpp_cuda_op_equals_its_cpu_op(dtype):
    """Each op of deq_fast._C with a CUDA kernel against the same op's CPU kernel (the self-test
    runs the same cases: deq_fast.selftest.run_cpp_cuda_checks)."""
    from deq_fast.selftest import cpp_cuda_cases, run_cpp_cuda_checks
    cuda_ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                if n.startswith("deq_fast::")
                and torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")}
    assert cuda_ops == set(cpp_cuda_cases(dtype))   # every C++ CUDA op has a case
    rows = [r for r in run_cpp_cuda_checks() if r.dtype == {torch.float32: "fp32"}.get(dtype, "fp64")]
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]


@needs_ext
def test_cpp_cuda_cases_run_on_cpu():
    """The cases of the CUDA-vs-CPU check are valid inputs for the CPU kernels (runs everywhere)."""
    from deq_fast.selftest import cpp_cuda_cases
    for dtype in (torch.float32, torch.float64):
        for op, args in cpp_cuda_cases(dtype).items():
            getattr(torch.ops.deq_fast, op).default(*args)


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME
    for cand in (shutil.which("nvcc"), CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.slow                       # about a minute per file: nvcc for sm_80 and sm_90
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
@pytest.mark.parametrize("source", sorted(p.relative_to(CSRC).as_posix() for p in CSRC.rglob("*.cu")))
def test_cuda_source_compiles_for_sm80_sm90(source, tmp_path):
    """Proves that each csrc/**/*.cu (kernels, launches, registration, the shared HOST_DEVICE math)
    compiles with nvcc to sm_80 and sm_90 cubins against this torch's headers and the flags
    torch.utils.cpp_extension uses for a CUDAExtension.

    A CPU wheel of torch ships the c10/cuda and ATen/cuda headers but not the CMake-generated
    c10/cuda/impl/cuda_cmake_macros.h; it is recreated (one define, as in the CUDA wheel) in a
    temporary include directory when missing. What this does not prove: linking against
    libc10_cuda/libtorch_cuda and registering the CUDA kernels, which .ci/cuda_build_check.sh does
    with a CUDA build of torch; and running on a GPU (python -m deq_fast.selftest on a GPU machine).
    """
    from torch.utils import cpp_extension
    include = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CSRC / 'include'}"]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists()
               for p in cpp_extension.include_paths()):
        stub = tmp_path / "include" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        include.append(f"-I{tmp_path / 'include'}")
    obj = tmp_path / (source.replace("/", "_") + ".o")
    cmd = [_nvcc(), "-c", str(CSRC / source), "-o", str(obj), *include, "-std=c++20", "-O3",
           *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    data = obj.read_bytes()
    # the object's fatbinary holds one cubin per -gencode target
    assert b"-arch sm_80" in data and b"-arch sm_90" in data
    if source == "cuda/anderson_lstsq.cu":
        for scalar in (b"IfE", b"IdE"):  # float and double instantiations of the kernel
            assert b"anderson_lstsq_kernel" + scalar in data


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_zero_gram_is_one_hot_in_forward_and_backward(dtype):
    """One decided behaviour (csrc/include/deq_fast/anderson_lstsq.h): a zero Gram matrix (every
    residual zero) gives the one-hot step at the newest entry in the forward op, its reference and
    the backward's Anderson update. Negative check: uniform weights would move x to the mean of F."""
    zero = torch.zeros(2, 4, 4, dtype=dtype)
    want = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=dtype).expand(2, 4)
    for fn in (torch.ops.deq_fast.anderson_lstsq, anderson_lstsq_reference):
        torch.testing.assert_close(fn(zero, 3, 2, 1e-4, True), want, rtol=0, atol=0)
    B, D, m = 2, 9, 4
    x = torch.randn(B, D, dtype=dtype)
    F = torch.randn(m, B, D, dtype=dtype)                         # old slots differ from x
    G = torch.zeros(m, B, D, dtype=dtype)
    gram = torch.zeros(B, m, m, dtype=torch.float64)
    out = x.clone()
    torch.ops.deq_fast.bwd_anderson_mix(out, torch.zeros_like(x), F, G, gram,
                                        torch.ones(B, dtype=torch.bool), 2, 3, 1e-4)
    torch.testing.assert_close(out, x, rtol=0, atol=0)           # x + r with r = 0: F[newest]
