"""Every Triton kernel compiles ahead of time for real GPUs (sm_80, sm_90) from the arguments the
launchers really pass, without spills and with room to cover DRAM latency.

The interpreter (tests/ops/test_kernels.py) is more lenient than the GPU compiler (shapes,
dtype mixing, math that exists only for some dtypes) and never sees the variants the runtime
compiles, so the launches of one full-ring iteration of real solves are recorded
(``deq_fast.aot.one_iteration``: solves on ``meta`` tensors at the real size, every launch
recorded and not run) and compiled with the runtime's own specialisation
(``deq_fast.aot.specialize``: integer widths, value-1 constexprs, divisibility-by-16 hints of
pointers and integers, ``do_not_specialize``) by ``deq_fast.aot.compile_launches``, in
subprocesses without ``TRITON_INTERPRET`` and with a fresh Triton cache (module docstring of
``deq_fast/aot.py``). Shapes: a training state (B=128,
D=196,608: every stride a multiple of 16) in every dtype, and a small odd one (B=3, D=1000)
whose strides get no divisibility hints, in float32.

The register budget comes from the performance model (benchmarks/gpu_model.py): at the training
shape an SM must be able to hold enough blocks of a kernel to keep ``bandwidth x latency / SMs``
bytes of loads in flight (16 KB on an H100, 11 KB on an A100).
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
import triton  # noqa: F401  (a declared test dependency: imported, never skipped)

from benchmarks.gpu_model import GPUS, resident_per_sm, triton_kernel_shape
from deq_fast.aot import (
    Launch,
    TensorArg,
    compile_launches,
    distinct,
    load_round_trips,
    one_iteration,
    record_launches,
    record_solve,
    specialize,
    variant,
)

ARCHS = (80, 90)
GPU_OF_ARCH = {gpu.arch: gpu for gpu in GPUS.values()}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
# name -> (method, options, an iteration with full rings)
# (broyden_long: a ring of 512 slots, eight ring blocks; one tile of them spilled in float64)
SOLVES = {"anderson": ("anderson", dict(m=6), 7), "broyden": ("broyden", dict(memory=30), 31),
          "broyden_long": ("broyden", dict(memory=512), 513),
          "fixed_point": ("fixed_point", {}, 2), "damped": ("fixed_point", dict(tau=0.8), 2)}
SHAPES = {"train": (128, 196608), "odd": (3, 1000)}
CASES = [(solve, dtype, shape) for solve in SOLVES for dtype in DTYPES for shape in SHAPES
         if shape == "train" or dtype == "fp32"]
IDS = ["-".join(c) for c in CASES]
BOOKKEEPING = "_track_status_kernel"        # O(B), one program: latency bound by design


def case_launches(solve: str, dtype: str, shape: str) -> list:
    method, options, warm = SOLVES[solve]
    B, D = SHAPES[shape]
    return one_iteration(method, DTYPES[dtype], B, D, warm, **options)


@pytest.fixture(scope="module")
def compiled() -> dict:
    """case id -> [(launch, {arch: CompileFacts or error})], each variant compiled once."""
    per_case = {cid: case_launches(*case) for cid, case in zip(IDS, CASES)}
    unique = distinct([x for launches in per_case.values() for x in launches])
    facts = iter(compile_launches(unique, ARCHS))
    of_variant = {variant(x): {arch: next(facts) for arch in ARCHS} for x in unique}
    return {cid: [(x, of_variant[variant(x)]) for x in launches]
            for cid, launches in per_case.items()}


@pytest.mark.slow       # about a minute: ~40 variants per arch, the two archs side by side
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("case", IDS)
def test_compiles_without_spills(compiled, case, arch):
    kernels = {x.kernel for x, _ in compiled[case]}
    # two solver passes and the bookkeeping; fixed point: one fused pass and the bookkeeping
    fused = SOLVES[case.split("-")[0]][0] == "fixed_point"
    assert len(kernels) == (2 if fused else 3), kernels
    for launch, facts in compiled[case]:
        got = facts[arch]
        assert not isinstance(got, str), f"{launch.kernel}: {got}"
        assert got.arch == arch and got.num_warps == launch.num_warps
        assert got.spill_bytes == 0, f"{launch.kernel} spills {got.spill_bytes} B per thread"
        # ptxas puts spills on the stack too (one 512-slot Broyden tile in float64: 216-272 B)
        assert got.stack_bytes == 0, f"{launch.kernel} has {got.stack_bytes} B of stack"
        assert 0 < got.n_regs <= 255, (launch.kernel, got.n_regs)


# Broyden's bf16 kernels on sm_90 at L = 30: the blocks that fit an SM keep 15.9 KB of loads in
# flight, just short of the 16.1 KB needed; half states at L = 512: pass 2 with its ring-block
# loop takes 128 registers (2 blocks of 8 warps per SM), 2 x 8.0 KB
SHORT_OF_LATENCY = {"broyden-bf16-train-sm90", "broyden_long-fp16-train-sm90",
                    "broyden_long-bf16-train-sm90"}
ROOM_CASES = [pytest.param(case, arch, id=f"{case}-sm{arch}", marks=[pytest.mark.xfail(
    strict=True, reason="too few blocks of the current kernel fit an SM")]
    if f"{case}-sm{arch}" in SHORT_OF_LATENCY else []) for case in IDS for arch in ARCHS
    if case.endswith("-train")]        # the odd shape is too small to fill an SM at all


@pytest.mark.slow
@pytest.mark.parametrize("case,arch", ROOM_CASES)
def test_registers_leave_room_to_cover_latency(compiled, case, arch):
    gpu = GPU_OF_ARCH[arch]
    for launch, facts in compiled[case]:
        if launch.kernel == BOOKKEEPING or isinstance(facts[arch], str):
            continue                            # compile errors: the test above
        k = triton_kernel_shape(launch, facts[arch])
        room = resident_per_sm(k, gpu) * k.bytes_in_flight
        assert room >= gpu.bytes_in_flight_needed, (
            f"{launch.kernel}: {resident_per_sm(k, gpu)} blocks of {facts[arch].n_regs} registers "
            f"x {k.warps} warps fit an SM, {room / 1024:.1f} KB in flight < "
            f"{gpu.bytes_in_flight_needed / 1024:.1f} KB")


def test_aligned_launches_get_the_runtimes_hints():
    # the variants compiled above are the runtime's: 16-aligned pointers and strides that are
    # multiples of 16 carry tt.divisibility; the odd shape's strides do not
    train = case_launches("anderson", "fp32", "train")
    odd = case_launches("anderson", "fp32", "odd")
    for a, b in zip(train, odd):
        hints_a, hints_b = (
            {k for k, v in specialize(x).attrs.items() if ["tt.divisibility", 16] in v}
            for x in (a, b))
        assert hints_b < hints_a, a.kernel
        pointers = {(i,) for i, t in enumerate(specialize(a).signature.values())
                    if t.startswith("*")}
        assert pointers <= hints_a, a.kernel


@pytest.mark.parametrize("method,options,max_iter,shapes_only", [
    ("anderson", dict(m=3), 8, False), ("broyden", dict(memory=3), 8, False),
    ("fixed_point", {}, 8, False), ("broyden", dict(memory=300), 310, True)],
    ids=["anderson", "broyden", "fixed_point", "broyden-L300"])
def test_one_compile_per_kernel_and_dtype_in_a_solve(method, options, max_iter, shapes_only):
    # a real solve (interpreter on CPU, or the GPU) long enough for the rings to wrap twice;
    # the integers the host passes do not depend on the dtype. The 300-slot ring (five ring
    # blocks, n_valid crossing each block boundary, then wrapping) is recorded on meta tensors:
    # 310 iterations under the interpreter would take minutes
    keys = defaultdict(set)
    for x in record_solve(method, torch.float32, batch=2, dim=48, max_iter=max_iter,
                          shapes_only=shapes_only, **options):
        keys[x.kernel].add(specialize(x).key)
    several = {kernel: len(v) for kernel, v in keys.items() if len(v) > 1}
    assert len(keys) == (2 if method == "fixed_point" else 3), keys
    assert not several, f"compiles per kernel: {several}"


PTX_LOOP = """
$L__BB0_1:
	ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
	ld.global.v4.b32 {%r5, %r6, %r7, %r8}, [%rd2];
	{STORE}
	ld.global.v4.b32 {%r9, %r10, %r11, %r12}, [%rd3];
	@%p1 bra $L__BB0_1;
	st.global.b32 [%rd4], %r9;
"""


@pytest.mark.parametrize("store,trips", [("st.global.v4.b32 [%rd5], {%r1, %r2, %r3, %r4};", 2),
                                         ("add.s32 %r13, %r1, %r5;", 1)], ids=["store", "none"])
def test_load_round_trips_counts_loads_after_stores(store, trips):
    assert load_round_trips(PTX_LOOP.replace("{STORE}", store)) == trips
    assert load_round_trips("ld.global.b32 %r1, [%rd1];") == 0      # no loop


def test_recorded_launch_without_running_it():
    # a launcher on CPU tensors (interpreter) or CUDA: execute=False records and leaves outputs
    from deq_fast.kernels import fixed_point_step

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = torch.randn(4, 40, device=dev)
    x, fx = base[1:3, :37], torch.randn(2, 37, device=dev)   # x: a view 40 floats in
    best, sq = torch.zeros(2, 37, device=dev), torch.full((2, 2), -1.0, device=dev)
    flags = torch.zeros(2, dtype=torch.bool, device=dev)      # x and best stay put
    with record_launches(execute=False) as launches:
        fixed_point_step(x, fx, best, sq, flags, flags)
    assert bool((sq == -1.0).all())
    (launch,) = launches
    assert launch.kernel == "_fixed_point_step_kernel" and launch.num_warps >= 1
    args = launch.bound()
    assert args["x_ptr"] == TensorArg("float32", 40 * 4, (2, 37)) and args["D"] == 37
    assert Launch.from_json(launch.to_json()) == launch
    with record_launches() as ran:
        fixed_point_step(x, fx, best, sq, flags, flags)
    assert len(ran) == 1 and torch.allclose(sq[:, 1], fx.square().sum(1))
