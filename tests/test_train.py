"""The training command: smoke runs of each model, exact resume, bad input, non-finite losses,
interruption, and a 2-process torchrun run on CPU."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from deq_fast import train

pytest.importorskip("sklearn")

# Small and quick: 6 steps per epoch on the digits, warm-up of 3 steps, short solves.
FAST = ["--batch_size", "256", "--pretrain_steps", "3", "--f_max_iter", "5", "--b_max_iter", "5",
        "--num_threads", "1", "--progress", "false"]
LM_FAST = ["--model", "deq-lm-small", "--batch_size", "4", "--seq_len", "16",
           "--steps_per_epoch", "3", "--eval_batches", "2", "--pretrain_steps", "1",
           "--f_max_iter", "4", "--b_max_iter", "4", "--num_threads", "1", "--progress", "false"]


def _jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "full")
    assert train.main(FAST + ["--epochs", "2", "--out", out]) == 0
    return out


def test_digits_smoke_writes_metrics_checkpoint_plots_and_evaluates(digits_run, capsys):
    recs = _jsonl(os.path.join(digits_run, "metrics.jsonl"))
    assert [r["epoch"] for r in recs] == [1, 2]
    for key in ("train_loss", "test_acc", "f_nfe", "b_nfe", "residual", "seconds", "step"):
        assert key in recs[-1], key
    assert recs[0]["pretraining"] is False or recs[0]["step"] <= 3
    assert recs[-1]["f_nfe"] > 0 and recs[-1]["residual"] is not None
    assert 0.0 <= recs[-1]["test_acc"] <= 1.0 and recs[-1]["train_loss"] < recs[0]["train_loss"]
    steps = _jsonl(os.path.join(digits_run, "steps.jsonl"))
    assert [s["step"] for s in steps] == list(range(1, 13))
    for png in ("curves.png", "residuals.png"):
        with open(os.path.join(digits_run, png), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = train.load_checkpoint(digits_run)
    assert ckpt["step"] == 12 and ckpt["epoch"] == 2 and ckpt["config"]["model"] == "mdeq-digits"
    assert {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)
    assert not [f for f in os.listdir(digits_run) if ".tmp." in f]     # no temp files left
    capsys.readouterr()
    assert train.eval_main(["--ckpt", digits_run]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["test_acc"] == pytest.approx(recs[-1]["test_acc"], abs=1e-9)
    assert ev["step"] == 12


def test_resume_reproduces_the_uninterrupted_run(digits_run, tmp_path):
    out = str(tmp_path / "interrupted")
    assert train.main(FAST + ["--epochs", "2", "--out", out, "--max_steps", "8"]) == 0
    assert train.load_checkpoint(out)["step"] == 8              # mid-epoch 2
    assert train.main(["--resume", out]) == 0
    full = _jsonl(os.path.join(digits_run, "steps.jsonl"))
    resumed = _jsonl(os.path.join(out, "steps.jsonl"))
    assert [s["step"] for s in resumed] == list(range(1, 13))
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), a["step"]
    assert full[8]["loss"] == resumed[8]["loss"]                # step 9: bit-identical
    ra = _jsonl(os.path.join(digits_run, "metrics.jsonl"))
    rb = _jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rb) == 2 and rb[-1]["test_acc"] == ra[-1]["test_acc"]


def test_resume_refuses_an_incompatible_configuration(digits_run, tmp_path, capsys):
    run = str(tmp_path / "copy")
    shutil.copytree(digits_run, run)
    assert train.main(["--resume", run, "--f_solver", "broyden", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--f_solver: checkpoint 'anderson', command line 'broyden'" in err
    assert "--lr" in err
    # a damaged checkpoint is named, never half-loaded
    path = os.path.join(run, train.CKPT_NAME)
    with open(path, "rb") as fh:
        raw = fh.read()
    with open(path, "wb") as fh:
        fh.write(raw[: len(raw) // 3])
    assert train.main(["--resume", run]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--model", "mdeq-huge"], "invalid choice: 'mdeq-huge'"),
    (["--f_slover", "anderson"], "unrecognized arguments: --f_slover"),
    (["--f_max_iter", "0"], "must be > 0"),
    (["--ift", "maybe"], "expected true/false"),
], ids=["model", "option", "value", "bool"])
def test_bad_options_exit_before_training(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--data", "cifar10"], "pass --data_dir"),
    (["--data", "cifar10", "--data_dir", "/nonexistent/cifar"], "'/nonexistent/cifar' does not "
                                                                 "exist"),
    (["--model", "deq-lm-small", "--data", "digits"], "needs data among"),
    (["--resume", "/nonexistent/run"], "no checkpoint at"),
], ids=["no-dir", "missing-dir", "kind", "resume"])
def test_bad_data_or_checkpoint_is_named(argv, match, capsys, tmp_path):
    assert train.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / train.CKPT_NAME)


def test_corrupt_cifar_file_is_named_before_training(tmp_path, capsys):
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"):
        (tmp_path / name).write_bytes(b"\x80\x02}q\x00(U")          # truncated pickle
    assert train.main(["--model", "mdeq-tiny", "--data_dir", str(tmp_path),
                       "--out", str(tmp_path / "o")]) == 2
    assert "data_batch_1 is corrupt or truncated" in capsys.readouterr().err


def _nan_at(step_to_break, monkeypatch, exc=None):
    calls = {"n": 0}
    real = train._compute_loss

    def fake(logits, target, *args):
        calls["n"] += 1
        loss = real(logits, target, *args)
        if calls["n"] == step_to_break:
            if exc is not None:
                raise exc
            return loss * float("nan")
        return loss
    monkeypatch.setattr(train, "_compute_loss", fake)


def test_nonfinite_loss_skip_and_stop(tmp_path, monkeypatch, capsys):
    _nan_at(2, monkeypatch)
    out = str(tmp_path / "skip")
    assert train.main(FAST + ["--epochs", "1", "--out", out]) == 0
    assert "non-finite loss (loss nan) at step 2 (epoch 1, batch 2); step skipped" \
        in capsys.readouterr().out
    assert _jsonl(os.path.join(out, "metrics.jsonl"))[0]["skipped"] == 1
    _nan_at(2, monkeypatch)
    assert train.main(FAST + ["--epochs", "1", "--nonfinite", "stop",
                              "--out", str(tmp_path / "stop")]) == 3
    assert "at step 2 (epoch 1, batch 2); stopped" in capsys.readouterr().err


def test_interrupt_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    _nan_at(5, monkeypatch, exc=KeyboardInterrupt())
    out = str(tmp_path / "int")
    assert train.main(FAST + ["--epochs", "1", "--ckpt_every", "2", "--out", out]) == 130
    assert "interrupted" in capsys.readouterr().err
    ckpt = train.load_checkpoint(out)
    assert ckpt["step"] == 4 and ckpt["batch_in_epoch"] == 4


def test_lm_smoke_with_bf16_autocast_and_jacobian_loss(tmp_path):
    out = str(tmp_path / "lm")
    assert train.main(LM_FAST + ["--epochs", "1", "--bf16", "--jac_loss_weight", "0.1",
                                 "--out", out]) == 0
    rec = _jsonl(os.path.join(out, "metrics.jsonl"))[0]
    assert rec["test_ppl"] > 1 and rec["unigram_loss"] == pytest.approx(3.18, abs=0.05)
    assert rec["f_nfe"] > 0 and torch.isfinite(torch.tensor(rec["train_loss"]))


def test_torchrun_two_processes_stay_in_sync_and_resume(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(train.__file__)))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "deq_fast.train"]
    common = FAST + ["--epochs", "1", "--out", out]
    r = subprocess.run(cmd + common + ["--max_steps", "3"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = train.load_checkpoint(out)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    assert len(set(ckpt["param_digests"])) == 1                 # identical on both ranks
    r = subprocess.run(cmd + ["--resume", out], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = train.load_checkpoint(out)
    assert ckpt["step"] == 6 and ckpt["epoch"] == 1 and len(set(ckpt["param_digests"])) == 1
    assert len(_jsonl(os.path.join(out, "metrics.jsonl"))) == 1  # written once, by rank 0
    assert [s["step"] for s in _jsonl(os.path.join(out, "steps.jsonl"))] == list(range(1, 7))


def test_console_script_dispatch(capsys, digits_run):
    from deq_fast import cli
    assert cli.main(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert cli.main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert cli.main(["eval", "--ckpt", digits_run]) == 0
    assert '"test_acc"' in capsys.readouterr().out


def test_mdeq_tiny_on_cifar10_files(tmp_path):
    """The CIFAR-10 path end to end (uint8 batches, normalisation, crop+flip) on tiny files."""
    import numpy as np
    import pickle
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        (tmp_path / name).write_bytes(pickle.dumps(entry, protocol=2))
    out = str(tmp_path / "run")
    assert train.main(["--model", "mdeq-tiny", "--data_dir", str(tmp_path), "--epochs", "1",
                       "--batch_size", "4", "--pretrain_steps", "1", "--f_max_iter", "3",
                       "--b_max_iter", "3", "--num_threads", "1", "--progress", "false",
                       "--out", out]) == 0
    rec = _jsonl(os.path.join(out, "metrics.jsonl"))[0]
    assert rec["step"] == 3 and 0.0 <= rec["test_acc"] <= 1.0 and rec["f_nfe"] > 0
