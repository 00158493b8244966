"""The pure parts of ``benchmarks/bench_locuslab.py`` (shapes read from the upstream configs, the
loader of the user's ``lib/solvers.py``, one timed row), on configuration text and a stand-in
"upstream" written here, with the locuslab-formula oracle of ``test_locuslab.py`` as the
original solver. Nothing of locuslab/deq is needed; nothing is asserted about time."""
from __future__ import annotations

import pathlib
import sys

import pytest
import torch

import deq_fast
from tests._modules import ROOT, load_module

bench = load_module("bench_locuslab", ROOT / "benchmarks" / "bench_locuslab.py")
oracle = load_module("_locuslab_oracle", pathlib.Path(__file__).with_name("test_locuslab.py"))

MDEQ_CONFIG = """MODEL:
  NAME: mdeq
  DOWNSAMPLE_TIMES: {ds}
  IMAGE_SIZE:
    - 32
    - 32
  EXTRA:
    FULL_STAGE:
      NUM_BRANCHES: {n}
      NUM_CHANNELS:
{channels}
      FUSE_METHOD: SUM
DEQ:
  F_SOLVER: 'broyden'
  B_SOLVER: 'anderson'
  STOP_MODE: 'rel'
  F_THRES: 18
  B_THRES: 20
"""

RUN_SCRIPT = """#!/bin/bash
if [[ $1 == 'train' ]]; then
    python train_transformer.py \\
        --cuda \\
        --d_model 700 \\
        --tgt_len 150 \\
        --multi_gpu \\
        --f_solver anderson \\
        --b_solver broyden \\
        --f_thres 30 \\
        --b_thres 35 \\
        --batch_size 56 \\
        --gpu0_bsz 14 \\
        ${@:2}
fi
"""


def _mdeq_config(tmp_path, channels, ds=0):
    text = MDEQ_CONFIG.format(ds=ds, n=len(channels),
                              channels="\n".join(f"      - {c}" for c in channels))
    path = tmp_path / "cls_mdeq_X.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("channels,ds,expected", [
    ([24, 24], 0, 24 * 32 * 32 + 24 * 16 * 16),                              # 30720 (CIFAR TINY)
    ([32, 64, 128, 256], 0, 32 * 1024 + 64 * 256 + 128 * 64 + 256 * 16),     # 61440 (CIFAR LARGE)
    ([8, 16], 1, 8 * 16 * 16 + 16 * 8 * 8),
], ids=["tiny", "large", "downsampled"])
def test_mdeq_packed_state_from_config(tmp_path, channels, ds, expected):
    fwd, bwd = bench.mdeq_shapes(_mdeq_config(tmp_path, channels, ds), batch=2)
    assert (fwd.B, fwd.d, fwd.L, fwd.D) == (2, expected, 1, expected)
    assert (fwd.method, fwd.threshold, bwd.method, bwd.threshold) == ("broyden", 18, "anderson", 20)


def test_missing_config_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("DEQ:\n  F_SOLVER: 'broyden'\n")
    with pytest.raises(KeyError, match="NUM_CHANNELS"):
        bench.mdeq_shapes(path, batch=2)


def test_deq_sequence_shapes_from_run_script(tmp_path):
    path = tmp_path / "wt103_deq_transformer.sh"
    path.write_text(RUN_SCRIPT)
    flags = bench.script_flags(RUN_SCRIPT)
    assert flags["cuda"] == "" and flags["d_model"] == "700"
    shapes = bench.deq_sequence_shapes(path, batches=(2,))
    assert [(s.B, s.d, s.L, s.method, s.threshold) for s in shapes] == [
        (2, 700, 150, "anderson", 30), (2, 700, 150, "broyden", 35),
        (14, 700, 150, "anderson", 30), (14, 700, 150, "broyden", 35)]


def test_shapes_deduplicated_across_configs():
    a = bench.ClientShape("c", "one", 2, 10, 1, "broyden", 18)
    b = bench.ClientShape("c", "two", 2, 10, 1, "broyden", 18)
    c = bench.ClientShape("c", "three", 2, 10, 1, "broyden", 20)
    assert bench._dedup([a, b, c]) == [a, c]


FAKE_SOLVERS = '''
import torch
from termcolor import colored

def anderson(f, x0, **kwargs):
    H, y = kwargs["H"], kwargs["y"]
    return {"result": torch.solve(y, H)[0], "label": colored("ok", "red")}

broyden = anderson
'''


def test_upstream_loader_supplies_torch_solve_to_that_module_only(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "solvers.py").write_text(FAKE_SOLVERS)
    module = bench.load_upstream_solvers(tmp_path)
    H = torch.randn(3, 4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    y = torch.randn(3, 4, 1, dtype=torch.float64)
    out = module.anderson(None, None, H=H, y=y)
    torch.testing.assert_close(H @ out["result"], y, rtol=0, atol=1e-12)
    assert "ok" in out["label"]
    assert "termcolor" not in sys.modules or sys.modules["termcolor"].__file__   # no stub left
    with pytest.raises(RuntimeError):              # the global torch is left as it is
        torch.solve(y, H)


def test_upstream_loader_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="lib/solvers.py"):
        bench.load_upstream_solvers(tmp_path)


def test_without_upstream_the_benchmark_says_what_it_needs(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([])
    assert exc.value.code == 2
    assert "--upstream DIR" in capsys.readouterr().err


def _counted(solver, counts):
    def run(f, x0, **kwargs):
        def fc(z):
            counts[-1] += 1
            return f(z)
        counts.append(0)
        return solver(fc, x0, **kwargs)
    return run


@pytest.mark.parametrize("method", ["anderson", "broyden"])
@pytest.mark.parametrize("fmap", bench.MAPS)
def test_timed_row_against_the_locuslab_oracle(method, fmap):
    """One row with the oracle standing in for the original: the figures are consistent with
    the times, both solvers evaluate ``f`` exactly ``n_evals`` times (what ``f alone`` runs),
    and the two results agree."""
    shape = bench.ClientShape("test", "tiny", 2, 6, 3, method, 12)
    counts_oracle, counts_ours = [], []
    original = {"anderson": _counted(oracle.oracle_anderson, counts_oracle),
                "broyden": _counted(oracle.oracle_broyden, counts_oracle)}
    ours = {"anderson": _counted(deq_fast.anderson, counts_ours),
            "broyden": _counted(deq_fast.broyden, counts_ours)}
    row = bench.time_row(shape, fmap, original, ours, repeats=3)
    assert set(counts_oracle) == set(counts_ours) == {shape.n_evals}
    assert len(row["times_s"]["original"]) == len(row["times_s"][bench.F_ALONE]) == 3
    assert row["ratio"] == pytest.approx(row["deq_fast_ms"] / row["original_ms"])
    assert row["floor"] == pytest.approx(row["f_alone_ms"] / row["original_ms"])
    assert 0 <= row["max_abs_dz"] < 1e-4
    assert (row["B"], row["D"], row["map"]) == (2, 18, fmap)
    text = bench.markdown([row], "machine", "command", 3)
    assert f"**{row['ratio']:.2f}**" in text and f"{row['floor']:.2f}" in text
    assert bench.summary([row])[0].startswith(f"test {method}: largest ratio {row['ratio']:.2f}")
