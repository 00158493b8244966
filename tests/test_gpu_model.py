"""The arithmetic of the GPU performance model (benchmarks/gpu_model.py): floors, the traffic
of the recorded launches, occupancy, Little's law and wave quantisation, each against a value
worked out by hand. Correctness only: nothing here is timed."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from benchmarks.gpu_model import (
    GPU,
    GPUS,
    Case,
    KernelShape,
    iteration_launches,
    kernel_time,
    loop_trips,
    resident_per_sm,
    traffic,
    triton_kernel_shape,
    wave_sizes,
)

# a made-up GPU with round numbers: 4 SMs, 1 GB/s, 1 µs latency
TOY = GPU("toy", 90, sms=4, dram_bytes_per_s=1e9, dram_latency_s=1e-6, smem_per_sm=64 * 1024)


def shape(programs=4, warps=4, regs=32, shared=0, moved=4000.0, trips=2, read=None):
    return KernelShape("k", programs, warps, regs, shared, moved, trips,
                       moved if read is None else read)


def test_floors_by_hand():
    # B=2, D=3: Anderson m=4 -> (2·4 + 3)·6 elements · 4 bytes; Broyden L=2 -> (4·2 + 13)·6·2
    # bytes (bf16); fixed point -> 3·6·8 bytes (float64)
    assert Case("anderson", 2, 3, torch.float32, m=4).floor_bytes == 11 * 6 * 4 == 264
    assert Case("broyden", 2, 3, torch.bfloat16, memory=2).floor_bytes == 21 * 6 * 2 == 252
    assert Case("fixed_point", 2, 3, torch.float64).floor_bytes == 3 * 6 * 8 == 144


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,rows", [("anderson", lambda m, L: 2 * m + 4),
                                         ("broyden", lambda m, L: 4 * L + 13),
                                         ("fixed_point", lambda m, L: 3)],
                         ids=["anderson", "broyden", "fixed_point"])
def test_iteration_traffic_is_the_kernels_documented_total(method, rows, dtype):
    # the launches of one full-ring iteration of a real (meta-tensor) solve, O(B) bookkeeping
    # aside, move what the kernels' docstrings add up to: (2m+4), (4L+13) and 3 state rows (the
    # fixed point's one fused pass: its floor)
    case = Case(method, 5, 96, dtype, m=3, memory=4)
    launches = iteration_launches(case)
    solver = [x for x in launches if x.kernel != "_track_status_kernel"]
    moved = sum(traffic(x).read + traffic(x).written for x in solver)
    assert moved == rows(3, 4) * 5 * 96 * dtype.itemsize
    assert len(launches) - len(solver) == 1           # one bookkeeping launch per iteration
    assert len(solver) == (1 if method == "fixed_point" else 2)



def test_long_broyden_ring_traffic_and_sweeps():
    # L = 130: three ring blocks of 64 slots; pass 1 reads g, g_old, dx again for blocks 2 and 3
    # (4·130 + 13 + 3·2 = 539 state rows), and both passes sweep their columns once per block
    B, D, s = 5, 96, 4
    launches = iteration_launches(Case("broyden", B, D, torch.float32, memory=130))
    passes = {x.kernel: traffic(x) for x in launches if x.kernel.startswith("_broyden")}
    assert sum(t.read + t.written for t in passes.values()) == 539 * B * D * s
    assert {t.extent for t in passes.values()} == {3 * B * D}

def test_resident_blocks_by_hand():
    h100 = GPUS["h100"]
    # 255 registers: 255·32 = 8160 -> 8192 per warp (units of 256) -> 8 warps -> 2 blocks of 4
    assert resident_per_sm(shape(regs=255), h100) == 2
    # 32 registers, 4 warps: the 64-warp limit -> 16 blocks
    assert resident_per_sm(shape(regs=32), h100) == 16
    # 100 KB of shared memory (+1 KB reserved each) in 228 KB -> 2 blocks
    assert resident_per_sm(shape(regs=32, shared=100 * 1024), h100) == 2
    # tiny blocks: the 32-block limit
    assert resident_per_sm(shape(regs=16, warps=1), h100) == 32


def test_wave_sizes():
    assert wave_sizes(10, 4) == [4, 4, 2]
    assert wave_sizes(8, 4) == [4, 4]
    assert wave_sizes(3, 4) == [3]


def test_littles_law_latency_bound():
    # 4 blocks (one per SM), 1000 bytes each in 2 dependent trips: 2 µs of latency against
    # 4000 B / 1 GB/s = 4 µs of bandwidth -> bandwidth bound; with 100 trips, latency bound
    bw = kernel_time(shape(trips=2), TOY)
    assert bw.time_s == pytest.approx(4e-6) and bw.bound == "bandwidth"
    lat = kernel_time(shape(trips=100), TOY)
    assert lat.time_s == pytest.approx(100e-6) and lat.bound == "latency"
    # Little's law: achieved bandwidth = bytes in flight / latency
    k = shape(trips=100)
    assert k.bytes_moved / lat.time_s == pytest.approx(k.programs * k.bytes_in_flight / 1e-6)


def test_wave_quantisation():
    # 16 warps per block on a 64-warp SM -> 4 per SM -> waves of 16 on the toy's 4 SMs;
    # 17 blocks of 1000 bytes, 1 trip: 16 000 B at 1 GB/s = 16 µs, then one block alone for
    # max(1 µs latency, 1 µs of bandwidth)
    k = shape(programs=17, warps=16, moved=17000.0, trips=1)
    t = kernel_time(k, TOY)
    assert t.waves == 2
    assert t.time_s == pytest.approx(16e-6 + 1e-6)
    assert t.per_sm == 4 and t.in_flight_per_sm == pytest.approx(4 * 1000.0)


def test_fixed_cost_is_added_once_per_launch():
    # the 17-block kernel of test_wave_quantisation (2 waves) with 3 µs of scalar work
    k = shape(programs=17, warps=16, moved=17000.0, trips=1)
    with_cost = dataclasses.replace(k, fixed_s=3e-6)
    assert kernel_time(with_cost, TOY).time_s == pytest.approx(kernel_time(k, TOY).time_s + 3e-6)
    assert kernel_time(with_cost, TOY).waves == 2


def test_loop_trips():
    # 5 loop steps of 2 round trips, + 1 for the prologue; a step makes at least one
    assert loop_trips(5, 2) == 11
    assert loop_trips(5, 0) == 6


def test_kernel_that_does_not_fit_names_itself():
    with pytest.raises(ValueError, match="k: no block fits"):
        kernel_time(shape(shared=300 * 1024), GPUS["h100"])


def test_from_threads():
    # 256 threads with 16 bytes each in flight: 4 KB per trip; 64 KB per block -> 16 trips + 1
    k = KernelShape.from_threads("bwd", programs=8, threads=256, regs_per_thread=40,
                                 shared_bytes=0, bytes_moved=8 * 80 * 1024.0,
                                 bytes_read=8 * 64 * 1024.0, bytes_in_flight_per_thread=16)
    assert (k.warps, k.trips) == (8, 17)
    assert k.bytes_in_flight == pytest.approx(64 * 1024 / 17)


def test_triton_shape_from_a_recorded_launch():
    # Anderson pass 1 at B=5, D=96, m=3 (M_PAD=4): per-sample grid, BLOCK_D from the launcher
    from deq_fast.aot import CompileFacts

    launch = next(x for x in iteration_launches(Case("anderson", 5, 96, torch.float32, m=3))
                  if x.kernel == "_anderson_residual_kernel")
    facts = CompileFacts(launch.kernel, 90, "key", n_regs=40, spill_bytes=0, stack_bytes=0,
                         shared_bytes=0, num_warps=4, round_trips=2)
    k = triton_kernel_shape(launch, facts)
    block = launch.options["BLOCK_D"]
    assert k.programs == launch.programs == 5
    assert k.trips == math.ceil(96 / block) * 2 + 1
    assert k.bytes_read == (3 + 1) * 5 * 96 * 4 and k.bytes_moved == (3 + 3) * 5 * 96 * 4
