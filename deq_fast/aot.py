"""Record the Triton launches deq_fast makes and compile them ahead of time for real GPUs.

A tool (top of the layer stack) for machines without a GPU. Three steps:

1. :func:`record_launches` intercepts every Triton kernel launch (``kernel[grid](...)`` ends in
   ``run`` of Triton's ``JITFunction`` or, under ``TRITON_INTERPRET=1``, ``InterpretedFunction``)
   and keeps a :class:`Launch`: the kernel, its grid, every argument (a tensor as its dtype and
   its byte offset in its allocation, the only facts of a pointer Triton specialises on) and the
   keyword arguments (constexprs, ``num_warps``). The launches still run unless ``execute=False``.
   :func:`record_solve` records a whole solve, with ``shapes_only`` on ``meta`` tensors at any
   size without running a kernel; :func:`one_iteration` keeps one full-ring iteration of it.
2. :func:`specialize` computes, with Triton's own binder (``create_function_from_signature`` and
   ``JITFunction._pack_args``, the code ``JITFunction.run`` calls), the signature, constexprs and
   attributes the runtime would compile for that call on a given target: pointers typed by their
   dtype, integers as ``i32``/``i64`` by value, an integer equal to 1 turned into a constexpr,
   ``tt.divisibility=16`` hints for 16-aligned pointers and multiples of 16, and none of these for
   parameters in the kernel's ``do_not_specialize``. Its ``key`` is the runtime's cache key: two
   calls with the same key share one compiled kernel.
3. :func:`compile_launches` compiles launches (:func:`distinct` keeps one per variant) with
   ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, one subprocess per arch run side by
   side, without ``TRITON_INTERPRET`` (once the
   interpreter has been imported, ``tl.sum`` and friends are interpreter objects that the compiler
   rejects) and a fresh Triton cache, and reads :class:`CompileFacts` from the result: registers
   and local memory per thread (``cuobjdump --dump-resource-usage`` on the cubin; Triton kernels
   have no local arrays, so local memory is spill space), shared memory, ``num_warps`` and the
   number of dependent load round trips in the kernel's main loop (:func:`load_round_trips`).

Example (the launches of an Anderson iteration at B=128, D=196,608, recorded in milliseconds on
``meta`` tensors; ``compile_launches`` would then take about a second per variant):
    >>> from deq_fast.aot import one_iteration, specialize
    >>> launches = one_iteration("anderson", torch.float32, 128, 196608, warm=7, m=6)
    >>> sorted({x.kernel for x in launches})
    ['_anderson_mix_kernel', '_anderson_residual_kernel', '_track_status_kernel']
    >>> spec = specialize(launches[0], arch=90)
    >>> spec.signature["x_ptr"], spec.attrs[(0,)]      # a 16-aligned float32 pointer
    ('*fp32', [['tt.divisibility', 16]])
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

__all__ = ["TensorArg", "Launch", "Specialization", "CompileFacts", "record_launches",
           "jit_function", "specialize", "record_solve", "one_iteration", "variant", "distinct",
           "compile_launch", "compile_launches", "load_round_trips"]


@dataclass(frozen=True)
class TensorArg:
    """A tensor argument as Triton's specialisation sees it, and its shape.

    ``offset`` is the byte offset of the tensor's first element in its allocation: GPU
    allocations start at least 256-byte aligned, so ``offset % 16`` decides the alignment hint
    on the GPU whatever the recording device was. ``shape`` is not part of the specialisation
    (the performance model reads sizes from it).
    """
    dtype: str
    offset: int
    shape: tuple = ()

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorArg":
        return cls(str(t.dtype).removeprefix("torch."), t.storage_offset() * t.element_size(),
                   tuple(t.shape))

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_pointer(self) -> "_Pointer":
        return _Pointer(self.torch_dtype, self.offset)


@dataclass(frozen=True)
class _Pointer:
    """What Triton's binder reads of a tensor argument: ``dtype`` and ``data_ptr()``."""
    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch (JSON-serialisable with :meth:`to_json` / :meth:`from_json`)."""
    kernel: str                  # the kernel function's name, e.g. "_anderson_mix_kernel"
    module: str                  # the module holding it, e.g. "deq_fast.kernels.anderson"
    grid: tuple
    args: tuple                  # positional values: TensorArg, int, float, bool, None
    kwargs: tuple                # sorted (name, value) pairs: constexprs and launch options

    @property
    def options(self) -> dict:
        return dict(self.kwargs)

    @property
    def num_warps(self) -> int:
        return int(self.options.get("num_warps", 4))

    @property
    def dtypes(self) -> tuple:
        """The dtypes of the tensor arguments, in order (the first one names the variant)."""
        return tuple(a.dtype for a in self.args if isinstance(a, TensorArg))

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    def bound(self) -> dict:
        """Argument name -> value (positional and keyword), as the kernel receives them."""
        names = list(inspect.signature(_python_function(self)).parameters)
        out = dict(zip(names, self.args))
        out.update((k, v) for k, v in self.kwargs if k in names)
        return out

    def to_json(self) -> dict:
        enc = [{"tensor": a.dtype, "offset": a.offset, "shape": list(a.shape)}
               if isinstance(a, TensorArg) else a for a in self.args]
        return {"kernel": self.kernel, "module": self.module, "grid": list(self.grid),
                "args": enc, "kwargs": [list(kv) for kv in self.kwargs]}

    @classmethod
    def from_json(cls, d: dict) -> "Launch":
        args = tuple(TensorArg(a["tensor"], a["offset"], tuple(a["shape"]))
                     if isinstance(a, dict) else a for a in d["args"])
        return cls(d["kernel"], d["module"], tuple(d["grid"]), args,
                   tuple((k, v) for k, v in d["kwargs"]))


def _kernel_object(launch: Launch):
    return getattr(importlib.import_module(launch.module), launch.kernel)


def _python_function(launch: Launch):
    return _kernel_object(launch).fn


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorArg.of(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


def _grid_tuple(kernel, grid, args: tuple, kwargs: dict) -> tuple:
    if callable(grid):
        names = list(inspect.signature(kernel.fn).parameters)
        grid = grid({**dict(zip(names, args)), **kwargs})
    return tuple(int(g) for g in grid)


def _launch_classes() -> list:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


@contextlib.contextmanager
def record_launches(execute: bool = True) -> Iterator[list]:
    """Collect every Triton kernel launch inside the block as :class:`Launch` records.

    Args:
        execute: also run the launches (``False``: record only; outputs stay unwritten).

    Yields:
        The list the launches are appended to, in launch order.
    """
    launches: list = []
    originals = {cls: cls.run for cls in _launch_classes()}

    def recording(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            launches.append(Launch(
                kernel=self.fn.__name__, module=self.fn.__module__,
                grid=_grid_tuple(self, grid, args, kwargs),
                args=tuple(_encode(a) for a in args),
                kwargs=tuple(sorted((k, _encode(v)) for k, v in kwargs.items()))))
            if execute:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            return None
        return run

    try:
        for cls, original in originals.items():
            cls.run = recording(original)
        yield launches
    finally:
        for cls, original in originals.items():
            cls.run = original


@dataclass(frozen=True)
class Specialization:
    """What the Triton runtime compiles for one call on one target."""
    signature: dict              # parameter name -> "*fp32", "i32", "i64", "u1", "constexpr", ...
    constexprs: dict             # (index,) -> value
    attrs: dict                  # (index,) -> [["tt.divisibility", 16]] or []
    options: Any                 # the backend's parsed options (CUDAOptions)
    key: str                     # the runtime's kernel cache key


def jit_function(launch: Launch):
    """The kernel as a ``JITFunction`` (rebuilt from its Python function under the interpreter)."""
    from triton.runtime.jit import JITFunction

    kernel = _kernel_object(launch)
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **kernel.kwargs)     # InterpretedFunction keeps jit's kwargs


def specialize(launch: Launch, arch: int = 90) -> Specialization:
    """The runtime's specialisation of ``launch`` for ``GPUTarget("cuda", arch, 32)``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    fn = jit_function(launch)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    # the two options JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    args = [a.as_pointer() if isinstance(a, TensorArg) else a for a in launch.args]
    bound, spec, options = binder(*args, **kwargs)
    key = compute_cache_key({}, spec, options)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return Specialization(signature, constexprs, attrs, options, key)


def record_solve(method: str, dtype: torch.dtype = torch.float32, batch: int = 3,
                 dim: int = 1040, max_iter: int = 8, shapes_only: bool = False,
                 **options: Any) -> list:
    """The launches of one Triton solve of ``f(z) = 0.5·tanh(z) + x``, ``x, z [batch, dim]``.

    ``tol=0`` and ``check_every=0``: every iteration launches the same kernels, none stops.
    ``options`` go to :func:`deq_fast.solve` (``m``, ``memory``, ``tau``, ...).

    Args:
        shapes_only: solve on ``meta`` tensors with the launchers called directly (as for CPU
            tensors) and the launches recorded, not run: the launches of a solve of any size,
            in milliseconds and without memory. Otherwise the solve runs on CUDA when present,
            else on CPU under the interpreter (``TRITON_INTERPRET=1`` set before
            ``deq_fast.kernels`` is imported).
    """
    from unittest import mock

    from deq_fast import solve
    from deq_fast.ops import dispatch

    device = "meta" if shapes_only else "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    x = (torch.empty(batch, dim, dtype=dtype, device="meta") if shapes_only else
         torch.randn(batch, dim, generator=gen).to(device=device, dtype=dtype))
    route = (mock.patch.object(dispatch, "_registered", dispatch._triton_direct) if shapes_only
             else contextlib.nullcontext())     # meta tensors would reach the ops' fake kernels
    with route, record_launches(execute=not shapes_only) as launches:
        solve(lambda z: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), method=method,
              max_iter=max_iter, tol=0.0, check_every=0, backend="triton", **options)
    return launches


def one_iteration(method: str, dtype: torch.dtype, batch: int, dim: int, warm: int,
                  **options: Any) -> list:
    """The launches of iteration ``warm`` (0-based) of a solve at ``[batch, dim]`` that goes on
    after it (recorded with ``shapes_only``). Pick ``warm`` past the history length so that the
    rings are full.

    A solve of ``k`` iterations launches ``c + p·k`` kernels (``c`` outside the loop, ``p`` per
    iteration); ``p`` and ``c`` come from solves of ``warm + 1`` and ``warm + 2`` iterations.
    """
    short = record_solve(method, dtype, batch, dim, warm + 1, shapes_only=True, **options)
    long = record_solve(method, dtype, batch, dim, warm + 2, shapes_only=True, **options)
    per = len(long) - len(short)
    first = len(short) - per * (warm + 1) + per * warm
    names = [x.kernel for x in long]
    if per <= 0 or first < per or names[first - per:first] != names[first:first + per]:
        raise RuntimeError(f"the {method} solve does not launch the same kernels every iteration")
    return long[first:first + per]


@dataclass(frozen=True)
class CompileFacts:
    """Resource use of one compiled variant (per thread unless stated)."""
    kernel: str
    arch: int
    key: str
    n_regs: int
    spill_bytes: int             # local memory per thread (spill stores' space)
    stack_bytes: int
    shared_bytes: int            # per program (block)
    num_warps: int
    round_trips: int             # dependent load round trips per step of the main loop


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple:
    """``(registers, stack bytes, static shared bytes, local bytes)`` of a one-kernel cubin."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", fh.name],
                             capture_output=True, text=True, check=True).stdout
    found = _RESOURCE.search(out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return tuple(int(v) for v in found.groups())


_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


def _loops(lines: list) -> list:
    """``(start, end)`` line ranges of the loops of a PTX function (backward branches)."""
    where = {}
    loops = []
    for i, line in enumerate(lines):
        label = _LABEL.match(line)
        if label:
            where[label.group(1)] = i
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in where:
            loops.append((where[branch.group(1)], i))
    return loops


def load_round_trips(ptx: str) -> int:
    """Dependent global-load round trips per iteration of the kernel's main loop.

    The main loop is the one with the most ``ld.global`` instructions. Loads issued after a
    ``st.global`` cannot be moved above it (the store may alias them) and the store's data
    depends on the loads before it, so each store between loads costs one more round trip to
    memory: the count is 1 + the number of load groups that follow a store. 0 without loads.
    """
    lines = ptx.splitlines()
    best = []
    for start, end in _loops(lines):
        body = [ln for ln in lines[start:end + 1] if "ld.global" in ln or "st.global" in ln]
        if sum("ld.global" in ln for ln in body) > sum("ld.global" in ln for ln in best):
            best = body
    trips, stored = 0, True
    for ln in best:
        if "ld.global" in ln and stored:
            trips, stored = trips + 1, False
        elif "st.global" in ln:
            stored = True
    return trips


def compile_launch(launch: Launch, arch: int) -> CompileFacts:
    """Compile ``launch``'s variant for ``sm_<arch>`` (needs a process without the interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = specialize(launch, arch)
    src = ASTSource(jit_function(launch), spec.signature, spec.constexprs, spec.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=spec.options.__dict__)
    regs, stack, shared, local = _resource_usage(compiled.asm["cubin"])
    return CompileFacts(kernel=launch.kernel, arch=arch, key=spec.key, n_regs=regs,
                        spill_bytes=local, stack_bytes=stack,
                        shared_bytes=max(shared, int(compiled.metadata.shared)),
                        num_warps=int(compiled.metadata.num_warps),
                        round_trips=load_round_trips(compiled.asm["ptx"]))


def variant(launch: Launch, arch: int = 90) -> tuple:
    """What names a compiled kernel: ``(module, kernel, specialisation key)``."""
    return launch.module, launch.kernel, specialize(launch, arch).key


def distinct(launches: Sequence[Launch], arch: int = 90) -> list:
    """One launch per distinct compiled :func:`variant`, first seen first."""
    seen: dict = {}
    for launch in launches:
        seen.setdefault(variant(launch, arch), launch)
    return list(seen.values())


def compile_launches(launches: Sequence[Launch], archs: Sequence[int] = (80, 90),
                     timeout: float = 1800.0) -> list:
    """Compile every launch for every arch, one subprocess per arch (run side by side) without
    ``TRITON_INTERPRET`` and with a fresh Triton cache.

    Returns:
        ``[CompileFacts or error string]`` in the order ``[(l, a) for l in launches for a in
        archs]``; a failed compile gives its error message instead of facts.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        src = os.path.join(tmp, "launches.json")
        with open(src, "w") as fh:
            json.dump([x.to_json() for x in launches], fh)
        jobs = {arch: os.path.join(tmp, f"sm{arch}.json") for arch in archs}
        procs = {arch: subprocess.Popen([sys.executable, "-m", "deq_fast.aot", src, str(arch), dst],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True) for arch, dst in jobs.items()}
        per_arch = {}
        for arch, proc in procs.items():
            _, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"the sm_{arch} compile subprocess failed:\n{err[-4000:]}")
            with open(jobs[arch]) as fh:
                per_arch[arch] = json.load(fh)
    return [CompileFacts(**r) if isinstance(r, dict) else r
            for i in range(len(launches)) for r in (per_arch[a][i] for a in archs)]


def _compile_file(src: str, arch: int, dst: str) -> None:
    with open(src) as fh:
        launches = [Launch.from_json(entry) for entry in json.load(fh)]
    results: list[Any] = []
    for launch in launches:
        try:
            results.append(dataclasses.asdict(compile_launch(launch, arch)))
        except Exception as exc:          # reported per launch by the caller
            results.append(f"{type(exc).__name__}: {exc}"[-3000:])
    with open(dst, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":   # the compile subprocess: python -m deq_fast.aot IN.json ARCH OUT.json
    _compile_file(sys.argv[1], int(sys.argv[2]), sys.argv[3])
