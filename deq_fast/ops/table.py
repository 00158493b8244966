"""The op table of deq_fast: every op of the ``deq_fast`` namespace, declared once, registered here.

One row (:class:`OpSpec`) per op: its name, its schema (or ``None`` when the compiled extension
declares it, ``csrc/ops.cpp``), its pure-torch reference (the oracle and the fallback), its Triton
launcher (``deq_fast.kernels``), the dispatch keys where ``deq_fast._C`` has C++ kernels for it,
and its fake (shape-only) kernel. Importing this module registers the table with the PyTorch
dispatcher, once:

* schema: ``Library("deq_fast", "FRAGMENT").define`` for the solver ops, which exist with or
  without ``deq_fast._C``; the C++ ops' schemas come from ``csrc/ops.cpp`` (``TORCH_LIBRARY``);
* ``CompositeExplicitAutograd``: the reference, for every device without a more specific kernel;
* ``CPU`` / ``CUDA``: the C++ kernels, registered by ``deq_fast._C`` itself
  (``TORCH_LIBRARY_IMPL``) -- whatever the dispatcher holds for a key
  (``torch._C._dispatch_has_kernel_for_dispatch_key``) is left in place;
* ``CUDA`` (and ``CPU`` under ``TRITON_INTERPRET=1``, where no C++ kernel holds it): the Triton
  launcher, when Triton imports -- registered by :func:`register_triton` on first use of the
  ``triton`` backend, not at import (importing Triton costs about a second, and the interpreter
  switch must be set before ``deq_fast.kernels`` is imported);
* ``Meta``: the fake kernel (``torch.library.register_fake``), for ``torch.compile`` and
  ``opcheck``; the solver ops only mutate their arguments, so theirs returns nothing.

The solver ops are declared a second time in the namespace ``deq_fast_reference``
(``torch.ops.deq_fast_reference.<op>``: the same schema and fake, the reference as the only
kernel): the ``reference`` backend's ops under ``torch.compile``, where Dynamo cannot trace the
references' ``out=`` writes into strided views and must see an opaque op, as for the others.
All registration happens here, at import, never on a traced path.

So ``torch.ops.deq_fast.broyden_dots`` runs the fused C++ kernel on CPU tensors when the extension
is built, the Triton kernel on CUDA tensors, and the reference anywhere else -- chosen by the
dispatcher, not by an ``if`` on the device. :func:`deq_fast.ops.dispatch.get_ops` builds the
per-solve table the engine calls from these rows.

Example:
    >>> import torch
    >>> from deq_fast.ops.table import OPS_BY_NAME
    >>> x, fx, best, sq = torch.randn(2, 37), torch.randn(2, 37), torch.zeros(2, 37), torch.empty(2, 2)
    >>> flags = torch.ones(2, dtype=torch.bool)
    >>> torch.ops.deq_fast.fixed_point_step(x, fx, best, sq, flags, flags)   # sq: [2, 2]
    >>> OPS_BY_NAME["fixed_point_step"].reference is not None
    True
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Optional

import torch

from deq_fast.ops import backends, backward as bwd, extension
from deq_fast.ops.anderson import anderson_mix_reference, anderson_residual_reference
from deq_fast.ops.broyden import broyden_dots_reference, broyden_update_reference
from deq_fast.ops.fixed_point import fixed_point_step_reference
from deq_fast.ops.lstsq import anderson_lstsq_reference
from deq_fast.ops.status import track_status_reference

__all__ = ["OpSpec", "OPS", "OPS_BY_NAME", "SOLVER_OPS", "REFERENCE", "has_kernel",
           "register_triton"]

NAMESPACE = "deq_fast"
REFERENCE_NAMESPACE = "deq_fast_reference"  # the solver ops with only their reference kernel


def _no_output(*args: Any, **kwargs: Any) -> None:
    """Fake kernel of the in-place ops: they only mutate their (already allocated) arguments."""
    return None


def _fake_anderson_lstsq(gram: torch.Tensor, n: int, newest: int, lam: float,
                         scaled: bool) -> torch.Tensor:
    torch._check(1 <= n)
    torch._check(n <= gram.shape[1])
    return gram.new_empty((gram.shape[0], gram.shape[1]))


def _anderson_fits(x, fx, F, *args) -> bool:
    """anderson_residual's Triton launcher keeps the history in registers: ``m <= 16``."""
    from deq_fast import kernels
    return F.shape[1] <= kernels.anderson.MAX_M


def _anderson_mix_fits(F, *args) -> bool:
    from deq_fast import kernels
    return F.shape[1] <= kernels.anderson.MAX_M


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op of the ``deq_fast`` namespace.

    Attributes:
        name: ``torch.ops.deq_fast.<name>``.
        schema: the arguments and returns, ``"(Tensor x, Tensor(a!) y, ...) -> ()"`` (mutated
            arguments annotated); ``None`` when ``deq_fast._C`` declares the op (``csrc/ops.cpp``).
        reference: the pure-torch implementation (oracle; the kernel wherever no other one is
            registered).
        fake: the shape-only kernel for tracing.
        triton: name of the launcher in ``deq_fast.kernels``, or ``None``.
        triton_fits: predicate on the arguments: False makes the Triton registration run the
            reference instead (a launcher's size limit), checked on shapes only, no host sync.
        cpp: dispatch keys where ``deq_fast._C`` registers C++ kernels (``TORCH_LIBRARY_IMPL``).
        cpp_dtypes: state dtypes those C++ kernels take (the torch path calls the reference for
            others).
    """

    name: str
    schema: Optional[str]
    reference: Optional[Callable[..., Any]]
    fake: Callable[..., Any] = _no_output
    triton: Optional[str] = None
    triton_fits: Optional[Callable[..., bool]] = None
    cpp: tuple[str, ...] = ()
    cpp_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"


_BWD = "CPU", "CUDA"  # the backward ops: C++ kernels on both (csrc/cpu, csrc/cuda/backward_ops.cu)

OPS: tuple[OpSpec, ...] = (
    # ---- forward solver passes (deq_fast/ops/{anderson,broyden,fixed_point,status}.py)
    OpSpec("anderson_residual",
           "(Tensor x, Tensor fx, Tensor(a!) F, Tensor(b!) G, Tensor(c!) gram, Tensor(d!) sq, "
           "int slot) -> ()",
           anderson_residual_reference, triton="anderson_residual", triton_fits=_anderson_fits,
           cpp=("CPU",)),  # csrc/cpu/anderson.cpp
    OpSpec("anderson_mix",
           "(Tensor F, Tensor G, Tensor gram, Tensor(a!) x, Tensor(b!) best, Tensor improved, "
           "int n, int newest, float lam, bool scaled, float beta, bool keep_f) -> ()",
           anderson_mix_reference, triton="anderson_mix", triton_fits=_anderson_mix_fits,
           cpp=("CPU",)),  # csrc/cpu/anderson.cpp
    OpSpec("broyden_dots",
           "(Tensor x, Tensor fx, Tensor g_old, Tensor(a!) g, Tensor dx, Tensor U, Tensor V, "
           "Tensor(b!) abc, Tensor(c!) scal, int n_valid) -> ()",
           broyden_dots_reference, triton="broyden_dots", cpp=("CPU",)),  # any ring length
    OpSpec("broyden_update",
           "(Tensor(a!) x, Tensor g, Tensor g_old, Tensor(b!) dx, Tensor(c!) U, Tensor(d!) V, "
           "Tensor abc, Tensor scal, Tensor(e!) best, Tensor improved, Tensor active, int slot, "
           "int n_valid) -> ()",
           broyden_update_reference, triton="broyden_update", cpp=("CPU",)),
    OpSpec("fixed_point_step",
           "(Tensor(a!) x, Tensor fx, Tensor(b!) best, Tensor(c!) sq, Tensor improved, "
           "Tensor active, float tau=1.0) -> ()",
           fixed_point_step_reference, triton="fixed_point_step",
           cpp=("CPU",)),  # csrc/cpu/fixed_point.cpp
    OpSpec("track_status",
           "(Tensor sq, Tensor(a!) lowest, Tensor(b!) best_step, Tensor(c!) trace, "
           "Tensor(d!) active, Tensor(e!) improved, int t, float step, float tol, int stop_idx, "
           "bool whole_batch, bool stop_together, bool always_update, float rel_eps) -> ()",
           track_status_reference, triton="track_status", cpp=("CPU",),   # csrc/cpu/status.cpp
           # it reads and writes only the accumulation-dtype bookkeeping (float32 for half states)
           cpp_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)),
    # ---- Anderson's small solve (csrc/include/deq_fast/anderson_lstsq.h; deq_fast/ops/lstsq.py)
    OpSpec("anderson_lstsq", None, anderson_lstsq_reference, fake=_fake_anderson_lstsq,
           cpp=("CPU", "CUDA")),
    # ---- backward linear solve updates (csrc/cpu/backward_ops.cpp, csrc/cuda/backward_ops.cu)
    OpSpec("bwd_track", None, bwd.bwd_track_reference, cpp=_BWD, cpp_dtypes=()),
    OpSpec("bwd_masked_add", None, bwd.bwd_masked_add_reference, cpp=_BWD, cpp_dtypes=()),
    OpSpec("bwd_anderson_mix", None, bwd.bwd_anderson_mix_reference, cpp=_BWD, cpp_dtypes=()),
    OpSpec("bwd_broyden_step", None, bwd.bwd_broyden_step_reference, cpp=_BWD, cpp_dtypes=()),
    OpSpec("bwd_gmres_start", None, bwd.bwd_gmres_start_reference, cpp=_BWD, cpp_dtypes=()),
    OpSpec("bwd_gmres_arnoldi", None, bwd.bwd_gmres_arnoldi_reference, cpp=_BWD, cpp_dtypes=()),
    OpSpec("bwd_gmres_update", None, bwd.bwd_gmres_update_reference, cpp=_BWD, cpp_dtypes=()),
)
OPS_BY_NAME = {spec.name: spec for spec in OPS}
#: the per-iteration passes of the forward solver engine (what ``get_ops`` returns)
SOLVER_OPS: tuple[OpSpec, ...] = tuple(s for s in OPS if s.schema is not None)
#: ``REFERENCE.<name>``: the pure-torch reference of each solver op (tests, self-test)
REFERENCE = types.SimpleNamespace(**{s.name: s.reference for s in SOLVER_OPS})


def _has_schema(qualname: str) -> bool:
    try:
        torch._C._get_schema(qualname, "")
    except RuntimeError:
        return False
    return True


def has_kernel(spec: OpSpec, device_type: str) -> bool:
    """True when ``deq_fast._C`` registered a C++ kernel of ``spec`` for ``device_type``.

    Static once the extension is loaded (registration happens at its import), so callers may
    cache the answer.
    """
    key = device_type.upper()
    return (key in spec.cpp and extension.load() is not None and _has_schema(spec.qualname)
            and torch._C._dispatch_has_kernel_for_dispatch_key(spec.qualname, key))


def _triton_launchers() -> tuple[tuple[str, ...], Any]:
    """``(device types, deq_fast.kernels)`` where the Triton launchers can run; never raises."""
    if not backends.triton_status()[0]:
        return (), None
    try:
        from deq_fast import kernels
    except Exception:  # a broken Triton install: the references stay in place
        return (), None
    # CPU tensors only when the kernels were built by the interpreter (TRITON_INTERPRET=1 before
    # deq_fast.kernels was first imported; a compiled kernel cannot run on CPU tensors)
    interpreted = type(kernels.KERNELS["fixed_point_step"]).__name__ == "InterpretedFunction"
    return ("cuda", "cpu") if (interpreted and backends.interpreter_enabled()) else ("cuda",), kernels


def _triton_kernel(spec: OpSpec, launcher: Callable[..., None]) -> Callable[..., None]:
    if spec.triton_fits is None:
        return launcher
    fits, reference = spec.triton_fits, spec.reference

    def kernel(*args: Any) -> None:
        return launcher(*args) if fits(*args) else reference(*args)
    kernel.__name__ = f"{spec.name}_triton"
    return kernel


def _register(lib: torch.library.Library, reference_lib: torch.library.Library) -> None:
    """Schemas, references and fakes of every row of :data:`OPS` (at import), and the solver
    ops' reference-only twins in :data:`REFERENCE_NAMESPACE`."""
    extension.load()  # the C++ schemas and kernels first: what they hold is left in place
    for spec in OPS:
        if spec.schema is not None:
            _define(lib, spec)
            _define(reference_lib, spec)
        elif _has_schema(spec.qualname):
            torch.library.register_fake(spec.qualname, spec.fake, lib=lib)
        # else: a C++ op and deq_fast._C is not built: callers take the reference


def _define(lib: torch.library.Library, spec: OpSpec) -> None:
    lib.define(spec.name + spec.schema)
    lib.impl(spec.name, spec.reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{lib.ns}::{spec.name}", spec.fake, lib=lib)


@functools.lru_cache(maxsize=None)
def triton_kernels() -> dict[str, Callable[..., None]]:
    """The Triton launcher of every solver op (size limits routed to the reference), called
    directly: how CPU tensors reach the interpreted kernels, whose dispatch key the C++ kernels
    hold. Empty without Triton."""
    _devices, kernels = _triton_launchers()
    if kernels is None:
        return {}
    return {spec.name: _triton_kernel(spec, getattr(kernels, spec.triton))
            for spec in SOLVER_OPS if spec.triton is not None}


def register_triton() -> tuple[str, ...]:
    """Registers the Triton launchers as the solver ops' kernels (once); returns the device
    types they serve (``()`` without Triton). A key that holds a C++ kernel keeps it."""
    devices, kernels = _triton_launchers()
    if kernels is None:
        return ()
    for spec in SOLVER_OPS:
        for device in devices:
            if spec.triton is not None and not has_kernel(spec, device):
                _LIB.impl(spec.name, _triton_kernel(spec, getattr(kernels, spec.triton)),
                          device.upper())
    return devices


# kept alive: dropping a Library deregisters what it registered
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_REFERENCE_LIB = torch.library.Library(REFERENCE_NAMESPACE, "DEF")
_register(_LIB, _REFERENCE_LIB)
