"""``python -m deq_fast.selftest`` on CPU: the whole table (Triton under the interpreter, the C++
CPU ops), the timing rows against the measured copy bandwidth, the torchdeq rows, and the
GPU-only branches with the GPU mocked (device name, CUDA events, the capture mode)."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import torch

from deq_fast import selftest
from deq_fast.ops import extension, traffic
from deq_fast.ops.table import OPS_BY_NAME

needs_ext = pytest.mark.skipif(not extension.available(), reason="deq_fast._C not built")
ROOT = Path(__file__).resolve().parents[1]
BWD_OPS = {op for op in traffic.BACKWARD_ROWS}


@needs_ext
@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["small-shapes-timing", "as-shipped"])
def test_main_on_cpu_prints_one_table_and_every_comparison_passes(full, tmp_path, capsys,
                                                                  monkeypatch):
    """Exit code 0; a header naming device, extension and Triton; one table whose rows are
    every Triton op x shape x dtype, each method's solve, every C++ CPU op, every C++ backward op
    at each shape and dtype; the JSON holds the same rows. Fast: one kernel shape, a small C++
    shape, and ``--timing`` at a small timing shape (the peak in the header, a timing row per
    op, the torchdeq rows); slow: the shapes the self-test ships with."""
    argv = ["--json", str(tmp_path / "selftest.json")]
    if not full:
        monkeypatch.setitem(selftest.KERNEL_SHAPES, "cpu", ((3, 37),))
        monkeypatch.setattr(selftest, "CPP_SHAPES", ((2, 40),))
        monkeypatch.setitem(selftest.TIMING_SHAPES, "cpu", (2, 64))
        monkeypatch.setattr(selftest, "TIMING_REPS", 2)
        argv.append("--timing")
    assert selftest.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("deq_fast.selftest: torch ") and "device cpu" in lines[0]
    assert lines[1].startswith("deq_fast._C loaded")
    if not full:
        assert re.fullmatch(r"peak bandwidth for the floors: [\d.]+ GB/s, measured copy_ .*",
                            lines.pop(2))
    assert lines[2].split()[:6] == ["check", "shape", "dtype", "max", "abs", "err"]
    assert set(lines[3]) == {"-"}
    data = json.loads(Path(argv[1]).read_text(), parse_constant=pytest.fail)  # strict: no NaN
    rows = [selftest.Row(**r) for r in data["rows"]]
    compared = [r for r in rows if r.ok is not None]
    assert len(lines) == 4 + len(rows) + 1 and re.fullmatch(
        rf"{len(compared)}/{len(compared)} comparisons passed", lines[-1])
    assert all(r.ok is True and r.err <= r.tol for r in compared), \
        [r for r in compared if not r.ok]
    checks = {r.check for r in rows}
    assert {f"triton {op}" for op in selftest.OPS} <= checks
    assert {f"C++ {op}" for op in selftest.OPS} <= checks
    assert {f"solve/{m}" for m in selftest.METHODS} <= checks
    cpp = [r for r in rows if r.check.removeprefix("C++ ") in BWD_OPS]
    assert len(cpp) == len(BWD_OPS) * len(selftest.CPP_SHAPES) * 2
    assert {r.shape.split()[0] for r in cpp} == {f"{B}x{D}" for B, D in selftest.CPP_SHAPES}
    timed = [r for r in rows if r.check.startswith("time ")]
    torchdeq = [r for r in rows if r.check.startswith("torchdeq/")]
    if full:
        assert not timed and not torchdeq and data["peak"] is None
    else:
        assert data["peak"]["bytes_per_s"] > 0
        assert [r.check for r in timed] == [f"time C++ {op}" for op in selftest.OPS] + \
            [f"time C++ {op}" for op in traffic.BACKWARD_ROWS]
        assert all(r.ok is None and r.gbps > 0 and r.x_floor > 0 for r in timed)
        assert [r.check for r in torchdeq] == [f"torchdeq/{m} eager" for m in selftest.METHODS]
    # each row is one line of the table, in order
    for row, line in zip(rows, lines[4:]):
        assert line.startswith(row.check)
        assert ("PASS" in line) == (row.ok is True) and "FAIL" not in line


def _vec_chunks(D: int, elem: int, cu: dict) -> int:
    """Chunks per sample the CUDA grid takes when D, not the SM count, limits it
    (split_for of backward_ops.cu)."""
    nvec = -(-D // (16 // elem))
    return max(1, nvec // (cu["kThreads"] * cu["kMinVecsPerThread"]))


def test_cpp_shapes_cover_the_cuda_launch_config():
    """From csrc/cuda/backward_ops.cu's constants: several chunks per sample in both dtypes,
    two or more column groups in each dots kernel, D with and without a vector tail, B = 1 and
    B > 1; the cases really carry those column counts."""
    source = (ROOT / "csrc" / "cuda" / "backward_ops.cu").read_text()
    cu = {k: int(v) for k, v in re.findall(r"^constexpr int (k\w+) = (\d+);", source, flags=re.M)}
    shapes = selftest.CPP_SHAPES
    for B, D in shapes:
        assert _vec_chunks(D, 4, cu) >= 2 and _vec_chunks(D, 8, cu) >= 2, (B, D)
    assert any(D % 4 and D % 2 for _, D in shapes) and any(D % 4 == 0 for _, D in shapes)
    assert {B == 1 for B, _ in shapes} == {True, False}
    cols = selftest.CPP_COLUMNS
    assert -(-cols["anderson"] // cu["kColsPerBlock"]) >= 2
    assert -(-(cols["arnoldi"] + 1) // cu["kColsPerBlock"]) >= 2
    assert -(-cols["broyden"] // cu["kBroydenColsPerBlock"]) >= 2
    cases = selftest.cpp_cuda_cases(torch.float32, *shapes[0])
    assert cases["bwd_anderson_mix"][2].shape[0] == cases["bwd_anderson_mix"][7] == cols["anderson"]
    assert cases["bwd_broyden_step"][4].shape[0] == cases["bwd_broyden_step"][7] == cols["broyden"]
    assert cases["bwd_gmres_arnoldi"][9] == cols["arnoldi"]
    assert (cases["bwd_gmres_arnoldi"][6] == cols["arnoldi"]).all()   # kdim: a real state


@needs_ext
def test_cpp_checks_fail_for_a_broken_op(monkeypatch):
    """The C++ rows compare: a reference that forgets the inactive samples' mask fails."""
    spec = OPS_BY_NAME["bwd_masked_add"]

    def unmasked(x, y, active):
        x.add_(y)

    monkeypatch.setitem(OPS_BY_NAME, "bwd_masked_add", dataclasses.replace(spec, reference=unmasked))
    monkeypatch.setattr(selftest, "CPP_SHAPES", ((3, 50),))
    rows = {r.check: r for r in selftest.run_cpp_checks("cpu") if r.dtype == "fp64"}
    assert rows["C++ bwd_masked_add"].ok is False
    assert rows["C++ bwd_track"].ok is True


@needs_ext
def test_no_cpp_rows_without_the_devices_kernels(monkeypatch):
    """A deq_fast._C built without nvcc on a GPU machine: the header says so (mocked)."""
    from deq_fast.ops import table

    assert selftest._cpp_kernels("cpu")[0] is True
    monkeypatch.setattr(table, "has_kernel", lambda spec, device_type: device_type != "cuda")
    ok, msg = selftest._cpp_kernels("cuda")
    assert not ok and msg.endswith("without CUDA kernels (built without nvcc? see docs/gpu.md): "
                                   "no C++ rows")


@needs_ext
def test_cpp_checks_against_the_cpu_op(monkeypatch):
    """The CUDA branch's comparison (device op against the CPU op), run with the CPU as the
    device: every op equals itself."""
    monkeypatch.setattr(selftest, "CPP_SHAPES", ((2, 40),))
    rows = selftest.run_cpp_checks("cpu", against="cpu op")
    assert rows and all(r.ok and r.err == 0 for r in rows), [r for r in rows if r.err]
    with pytest.raises(ValueError, match="against"):
        selftest.run_cpp_checks("cpu", against="gpu")


@needs_ext
@pytest.mark.parametrize("impl", ["C++", "triton"])
def test_timing_rows(impl, monkeypatch):
    """One row per forward op and per C++ backward op; GB/s and x floor are the traffic
    formula's bytes over the time and the time over those bytes at the peak (no wall-clock
    bound). ``triton``: the CUDA branch's launchers, here under the interpreter."""
    monkeypatch.setattr(selftest, "TIMING_REPS", 2)
    peak = selftest.Peak(5e9, "test")
    B, D = 2, 64
    rows = selftest.run_timing("cpu", peak, shape=(B, D), impl=impl)
    assert [r.check for r in rows] == [f"time {impl} {op}" for op in selftest.OPS] + \
        [f"time C++ {op}" for op in traffic.BACKWARD_ROWS]
    for r in rows:
        assert r.ok is None and r.shape == f"{B}x{D}" and r.us > 0 and r.base_us > 0, r
        moved = r.gbps * 1e3 * r.us
        assert r.x_floor == pytest.approx(r.us / (moved / peak.bytes_per_s * 1e6))
        assert r.note == "O(B) bytes: latency-bound"       # B·D this small
    anderson = rows[selftest.OPS.index("anderson_residual")]
    assert anderson.gbps * 1e3 * anderson.us == pytest.approx(
        traffic.anderson_residual(B, D, 4, 5).moved)


def test_torchdeq_rows_compare_with_torchdeq(monkeypatch):
    pytest.importorskip("torchdeq")
    monkeypatch.setattr(selftest, "TIMING_REPS", 2)
    rows = selftest.run_torchdeq_checks("cpu")
    assert [r.check for r in rows] == [f"torchdeq/{m} eager" for m in selftest.METHODS]
    assert all(r.ok and r.err <= r.tol and r.us > 0 and r.base_us > 0 for r in rows), rows
    assert all(r.note.endswith("x as fast as torchdeq") for r in rows)


def test_torchdeq_rows_without_torchdeq(monkeypatch):
    monkeypatch.setattr(selftest, "_torchdeq_solver", lambda method: None)
    rows = selftest.run_torchdeq_checks("cpu")
    assert [(r.ok, r.note) for r in rows] == [(None, "torchdeq not installed")] * 3
    assert "torchdeq not installed" in selftest.render(rows).splitlines()[2]


def test_peak_bandwidth_of_a_known_gpu_is_the_table(monkeypatch):
    """CUDA branch, mocked: an H100 SXM by name takes the datasheet figure; an unknown GPU is
    measured; the CPU is measured."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = selftest.peak_bandwidth("cuda")
    assert peak.bytes_per_s == traffic.GPUS["h100"].dram_bytes_per_s and "datasheet" in peak.source
    measured = []
    monkeypatch.setattr(selftest, "measure_copy_bandwidth",
                        lambda device, mib=256: measured.append(device) or 1.5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    peak = selftest.peak_bandwidth("cuda")
    assert (peak.bytes_per_s, measured) == (1.5e12, ["cuda"]) and "measured" in peak.source
    assert "measured" in selftest.peak_bandwidth("cpu").source and measured[-1] == "cpu"


def test_measured_copy_bandwidth_counts_read_and_write(monkeypatch):
    monkeypatch.setattr(selftest, "_time_us", lambda fn, reps=20, device="cuda": 1000.0)
    assert selftest.measure_copy_bandwidth("cpu", mib=4, reps=2) == 2 * 4 * 2 ** 20 / 1e-3


class _FakeEvent:
    """torch.cuda.Event on the host clock."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1e3


def test_time_us_uses_cuda_events_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    us = selftest._time_us(lambda: calls.append("call"), reps=4, device="cuda")
    assert us > 0 and calls == ["call", "sync"] + ["call"] * 4 + ["sync"]


def test_capture_mode_is_cuda_graphs_on_cuda(monkeypatch):
    """On CUDA the solve is compiled with mode="reduce-overhead" (CUDA graphs) and called until
    the graph is recorded; on CPU inductor's default mode."""
    modes = []

    def fake_compile(fn, mode=None, fullgraph=False):
        modes.append((mode, fullgraph))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    calls = []
    for device in ("cuda", "cpu"):
        captured = selftest._captured(lambda: calls.append(1) or torch.ones(2), device)
        assert torch.equal(captured(), torch.ones(2))
    assert modes == [("reduce-overhead", True), ("default", True)]
    assert len(calls) == 2 * 4


def test_render_marks_rows_that_compare_nothing():
    rows = [selftest.Row("a", "1x2", "fp32", 0.5, 1.0, True, 3.0, 4.0, 5.0, 6.0),
            selftest.Row("b", "1x2", "fp32", ok=False), selftest.Row("c", "1x2", "fp32")]
    lines = selftest.render(rows).splitlines()
    assert lines[2].split() == ["a", "1x2", "fp32", "5.000e-01", "1.0e+00", "PASS", "3.0", "4.0",
                                "5.00", "6.00"]
    assert lines[3].split()[3:6] == ["-", "-", "FAIL"]
    assert lines[4].split()[3:] == ["-"] * 7
