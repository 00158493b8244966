"""deq_fast.ops.traffic: the one copy of each op's byte count, against the op docstrings' totals,
the arguments of real calls, and the performance models that use it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from deq_fast.ops import traffic

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size", [2, 4, 8])
def test_iteration_totals_are_the_docstrings(size):
    """Anderson ``(2m + 4)·B·D·s`` per full-ring iteration, Broyden ``(4L + 13)·B·D·s``, fixed
    point ``3·B·D·s`` (deq_fast/ops/{anderson,broyden}.py, benchmarks/gpu_model.py)."""
    B, D, m, L = 3, 1000, 6, 30
    row = B * D * size
    anderson = traffic.anderson_residual(B, D, size, m).moved + traffic.anderson_mix(B, D, size, m,
                                                                                     1.0).moved
    assert anderson == (2 * m + 4) * row
    broyden = traffic.broyden_dots(B, D, size, L).moved + traffic.broyden_update(B, D, size,
                                                                                 L).moved
    assert broyden == (4 * L + 13) * row
    assert traffic.fixed_point_step(B, D, size).moved == 3 * row
    # beta != 1 reads one more operand
    assert traffic.anderson_mix(B, D, size, m, 0.5).read == 2 * m * row


def test_op_traffic_reads_the_ops_arguments():
    """``op_traffic`` takes ``m``, ``n``, ``beta``, ``n_valid``, ``tau`` and the columns from
    the positions of the op schemas (the self-test's cases)."""
    from deq_fast.selftest import _case, cpp_cuda_cases

    B, D = 3, 130
    for op, expected in [
        ("anderson_residual", traffic.anderson_residual(B, D, 4, 5)),
        ("anderson_mix", traffic.anderson_mix(B, D, 4, 5, 0.8)),
        ("broyden_dots", traffic.broyden_dots(B, D, 4, 6)),
        ("broyden_update", traffic.broyden_update(B, D, 4, 6)),
        ("fixed_point_step", traffic.fixed_point_step(B, D, 4)),
        ("track_status", traffic.track_status(B, 4)),
    ]:
        args, _ = _case(op, B, D, torch.float32, True, "cpu")
        assert traffic.op_traffic(op, args) == expected, op
    cols = {"anderson": 5, "broyden": 4, "arnoldi": 3}
    cases = cpp_cuda_cases(torch.float64, 2, 40, cols)
    state = 2 * 40 * 8
    assert traffic.op_traffic("bwd_anderson_mix", cases["bwd_anderson_mix"]).moved == 14 * state
    assert traffic.op_traffic("bwd_broyden_step", cases["bwd_broyden_step"]).moved == 27 * state
    assert traffic.op_traffic("bwd_gmres_arnoldi", cases["bwd_gmres_arnoldi"]).moved == 18 * state
    assert traffic.op_traffic("bwd_gmres_update", cases["bwd_gmres_update"]).moved == 6 * state
    assert traffic.op_traffic("anderson_lstsq", cases["anderson_lstsq"]) is None


def test_backward_model_passes_add_up_to_the_package_floor():
    """benchmarks/gpu_model_backward.py describes each op pass by pass; the passes' bytes are
    what BACKWARD_ROWS says the kernels move, and the floors are read from it."""
    gm = _load("gpu_model_backward")
    for m, L, j, k in [(6, 20, 19, 20), (3, 5, 0, 1), (14, 8, 13, 14)]:
        for op in gm.ops(m, L, j, k):
            moved = sum(p.read + p.written for p in op.steps if isinstance(p, gm.Pass))
            columns = {"bwd_anderson_mix": m, "bwd_broyden_step": L, "bwd_gmres_arnoldi": j,
                       "bwd_gmres_update": k}.get(op.name, 0)
            assert (op.contract, op.algorithm) == traffic.BACKWARD_ROWS[op.name](columns)
            assert moved == op.algorithm, op.name


def test_forward_model_uses_the_package_formulas():
    """benchmarks/gpu_model.py's TRAFFIC (by kernel name, from a launch's arguments) and GPUS
    are the package's."""
    gm = _load("gpu_model")
    assert gm.GPUS is traffic.GPUS
    x = torch.empty(3, 1000, device="meta")
    t = gm.TRAFFIC["_anderson_mix_kernel"](dict(x_ptr=x, D=1000, n=4, beta=0.5))
    assert (t.read, t.written) == (8 * 3000 * 4, 3000 * 4)
    assert (t.extent, t.block) == (3000, "BLOCK_D")


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA H100 PCIe", None), ("NVIDIA A100-PCIE-40GB", None), ("NVIDIA GeForce RTX 4090", None)])
def test_known_gpu_by_device_name(name, expected):
    """Only the variants whose bandwidth the table holds (PCIe parts differ)."""
    gpu = traffic.known_gpu(name)
    assert gpu is (traffic.GPUS[expected] if expected else None)
