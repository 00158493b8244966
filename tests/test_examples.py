"""The examples, run as a user runs them, at smoke size: each prints what it shows, and the
output is checked."""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SMOKE_TRAIN = ["--batch_size", "256", "--pretrain_steps", "3", "--f_max_iter", "5",
               "--b_max_iter", "5", "--num_threads", "1", "--progress", "false"]


def _run_example(name, monkeypatch, capsys) -> str:
    """Run ``examples/<name> --smoke`` as ``__main__`` in this process; its standard output."""
    path = os.path.join(EXAMPLES, name)
    monkeypatch.setattr(sys, "argv", [path, "--smoke"])
    runpy.run_path(path, run_name="__main__")
    return capsys.readouterr().out


def _test_accuracies(out: str) -> list[float]:
    return [float(a) for a in re.findall(r"test acc ([0-9.]+)%", out)]


@pytest.mark.slow
def test_locuslab_style_example_trains_and_its_hook_gives_the_exact_gradient(monkeypatch,
                                                                             capsys):
    out = _run_example("locuslab_style_deq.py", monkeypatch, capsys)
    acc = _test_accuracies(out)
    assert len(acc) == 1 and acc[0] > 15.0                      # 1 epoch; chance is 10 %
    err = float(re.search(r"vs finite differences: relative error ([0-9.e+-]+)", out).group(1))
    assert err < 1e-5
    assert out.rstrip().splitlines()[-1].startswith("shown: the locuslab/deq layer")


@pytest.mark.slow
def test_torchdeq_migration_example_trains_and_refuses_a_misspelt_option(monkeypatch, capsys):
    out = _run_example("torchdeq_migration.py", monkeypatch, capsys)
    acc = _test_accuracies(out)
    assert len(acc) == 1 and acc[0] > 15.0
    assert "a misspelt option is refused: get_deq() got an unexpected keyword argument " \
        "'f_max_iters'; did you mean 'f_max_iter'?" in out
    assert out.rstrip().splitlines()[-1].startswith("shown: a TorchDEQ-style model")


def _run_shell_example(args: list[str], cwd: str) -> str:
    """``sh examples/mdeq_digits.sh ARGS`` in ``cwd``, with this interpreter's ``deq-fast``."""
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    r = subprocess.run(["sh", os.path.join(EXAMPLES, "mdeq_digits.sh")] + args, cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_shell_example_evaluates_the_run_it_trained(tmp_path):
    """From a directory with no ``runs/`` (as in a fresh clone), the evaluation is of the run the
    script trained, with ``--out`` and with the default run directory."""
    out = _run_shell_example(SMOKE_TRAIN + ["--epochs", "1", "--out", "mine"], str(tmp_path))
    assert "summary: 1/1 epochs" in out
    ev = _last_json(out)
    with open(tmp_path / "mine" / "metrics.jsonl") as fh:
        last = json.loads(fh.readlines()[-1])
    assert ev["test_acc"] == pytest.approx(last["test_acc"], abs=1e-9) and ev["step"] == 6
    assert "evaluating the run just trained (mine)" in out
    assert out.rstrip().splitlines()[-2].startswith("shown: deq-fast train wrote mine")
    # default --out: runs/mdeq-digits-<timestamp> in the working directory
    out = _run_shell_example(SMOKE_TRAIN + ["--max_steps", "2"], str(tmp_path))
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and runs[0].startswith("mdeq-digits-")
    assert f"evaluating the run just trained (runs/{runs[0]})" in out
    assert _last_json(out)["step"] == 2
