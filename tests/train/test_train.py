"""The training command: smoke runs of each model, exact resume, bad input, non-finite losses,
interruption, the ``train`` extra, and a 2-process torchrun run on CPU."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import sklearn  # noqa: F401  (declared test dependency: the embedded digits)
import torch

from deq_fast import train
from deq_fast.models import get_config
from deq_fast.train import cli, loop
from deq_fast.train.checkpoint import CKPT_NAME, load_checkpoint
from deq_fast.train.config import TrainConfig, TrainingError, resolve_config, resume_config
from deq_fast.train.records import EpochStats, atomic_write_bytes

# Small and quick: 6 steps per epoch on the digits, warm-up of 3 steps, short solves.
FAST = ["--batch_size", "256", "--pretrain_steps", "3", "--f_max_iter", "5", "--b_max_iter", "5",
        "--num_threads", "1", "--progress", "false"]
LM_FAST = ["--model", "deq-lm-small", "--batch_size", "4", "--seq_len", "16",
           "--steps_per_epoch", "3", "--eval_batches", "2", "--pretrain_steps", "1",
           "--f_max_iter", "4", "--b_max_iter", "4", "--num_threads", "1", "--progress", "false"]


def _jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class _Clock:
    """Stands in for the ``time`` module of the training loop: the clock advances 100 s per
    training step (each call of ``compute_loss``) and not otherwise, so ``seconds``/``elapsed``
    are exact."""

    def __init__(self, monkeypatch):
        self.now = 1000.0
        real = loop.compute_loss

        def loss(*args):
            self.now += 100.0
            return real(*args)
        monkeypatch.setattr(loop, "time", self)
        monkeypatch.setattr(loop, "compute_loss", loss)

    def time(self):
        return self.now


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
    ckpt = load_checkpoint(digits_run)
    assert ckpt["step"] == 12 and ckpt["epoch"] == 2 and ckpt["config"]["model"] == "mdeq-digits"
    assert {"model", "optimizer", "scheduler", "rng"} <= set(ckpt)
    assert not [f for f in os.listdir(digits_run) if ".tmp." in f]     # no temp files left
    capsys.readouterr()
    assert train.eval_main(["--ckpt", digits_run]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["test_acc"] == pytest.approx(recs[-1]["test_acc"], abs=1e-9)
    assert ev["step"] == 12 and ev["split"] == "test"
    assert train.eval_main(["--ckpt", digits_run, "--split", "valid"]) == 2
    assert "--split valid: digits has no validation split" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(digits_run, tmp_path, monkeypatch):
    _Clock(monkeypatch)                                         # 100 s per step
    out = str(tmp_path / "interrupted")
    assert train.main(FAST + ["--epochs", "2", "--out", out, "--max_steps", "8"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 8                                    # mid-epoch 2
    assert ckpt["epoch_partial"]["seconds"] == 200.0 and ckpt["elapsed"] == 800.0
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
    # the resumed epoch's record covers the whole epoch, as in the uninterrupted run
    for key in ("train_loss", "train_acc", "f_nfe", "b_nfe", "residual", "b_residual"):
        assert rb[-1][key] == pytest.approx(ra[-1][key], rel=1e-9), key
    assert rb[-1]["skipped"] == ra[-1]["skipped"] == 0
    assert [(r["seconds"], r["elapsed"]) for r in rb] == [(600.0, 600.0), (600.0, 1200.0)]


def test_resume_refuses_an_incompatible_configuration(digits_run, tmp_path, capsys):
    run = str(tmp_path / "copy")
    shutil.copytree(digits_run, run)
    assert train.main(["--resume", run, "--f_solver", "broyden", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--f_solver: checkpoint 'anderson', command line 'broyden'" in err
    assert "--lr" in err
    # a damaged checkpoint is named, never half-loaded
    path = os.path.join(run, CKPT_NAME)
    with open(path, "rb") as fh:
        raw = fh.read()
    with open(path, "wb") as fh:
        fh.write(raw[: len(raw) // 3])
    assert train.main(["--resume", run]) == 2
    assert f"--resume {path!r} is corrupt or truncated" in capsys.readouterr().err


def test_config_precedence_and_stored_configurations_are_checked(digits_run):
    cfg = resolve_config({"model": "deq-lm-small", "lr": 0.5, "out": "o", "resume": "r"})
    lm_defaults = get_config("deq-lm-small")["train"]
    assert cfg.lr == 0.5 and cfg.seq_len == lm_defaults["seq_len"] and cfg.seed == 0
    assert cfg.data == lm_defaults["data"] and "out" not in cfg.to_dict()
    stored = cfg.to_dict()
    resumed = resume_config({**stored, "max_steps": 7}, {"epochs": 9, "resume": "r"}, "r")
    assert resumed.epochs == 9 and resumed.max_steps == 0 and resumed.lr == 0.5
    with pytest.raises(TrainingError, match=r"ckpt has options this version does not know: "
                                            r"\['warmup'\]"):
        TrainConfig.from_dict({**stored, "warmup": 3}, "ckpt")
    del stored["lr"]
    with pytest.raises(TrainingError, match="ckpt has an incomplete configuration"):
        TrainConfig.from_dict(stored, "ckpt")
    with pytest.raises(TrainingError, match=r"overrides \['f_sovler'\]: not options"):
        train.evaluate_checkpoint(digits_run, {"f_sovler": "broyden"})


@pytest.mark.parametrize("module,dist", [("sklearn", "scikit-learn"),
                                         ("matplotlib", "matplotlib")])
def test_missing_train_extra_is_named_before_training(module, dist, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.setitem(sys.modules, module, None)             # `import module` raises
    out = str(tmp_path / "o")
    assert train.main(FAST + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert f"needs {dist}" in err and 'pip install "deq_fast[train]"' in err
    assert not os.path.exists(out)


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


def test_gmres_backward_trains(tmp_path):
    """deq_fast's GMRES backward is reachable from the command line and does its VJPs."""
    out = str(tmp_path / "gmres")
    assert train.main(FAST + ["--b_solver", "gmres", "--pretrain_steps", "0", "--max_steps", "2",
                              "--out", out]) == 0
    steps = _jsonl(os.path.join(out, "steps.jsonl"))
    assert len(steps) == 2 and all(0 < s["b_nfe"] <= 5 for s in steps)


@pytest.mark.parametrize("argv,match", [
    (["--data", "cifar10"], "pass --data_dir"),
    (["--data", "cifar10", "--data_dir", "/nonexistent/cifar"], "'/nonexistent/cifar' does not "
                                                                 "exist"),
    (["--model", "deq-lm-small", "--data", "digits"], "needs data among"),
    (["--resume", "/nonexistent/run"], "--resume '/nonexistent/run' does not exist; expected a "
                                       "run directory of deq-fast train or its checkpoint.pt"),
    (["--deq_impl", "torchdeq", "--b_solver", "gmres"], "is a deq_fast backward solver"),
], ids=["no-dir", "missing-dir", "kind", "resume", "gmres-on-torchdeq"])
def test_bad_data_or_checkpoint_is_named(argv, match, capsys, tmp_path):
    assert train.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert match in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / CKPT_NAME)


def test_corrupt_cifar_file_is_named_before_training(tmp_path, capsys):
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"):
        (tmp_path / name).write_bytes(b"\x80\x02}q\x00(U")          # truncated pickle
    assert train.main(["--model", "mdeq-tiny", "--data_dir", str(tmp_path),
                       "--out", str(tmp_path / "o")]) == 2
    assert "data_batch_1 is corrupt or truncated" in capsys.readouterr().err


def _nan_at(step_to_break, monkeypatch, exc=None):
    calls = {"n": 0}
    real = loop.compute_loss

    def fake(logits, target, *args):
        calls["n"] += 1
        loss = real(logits, target, *args)
        if calls["n"] == step_to_break:
            if exc is not None:
                raise exc
            return loss * float("nan")
        return loss
    monkeypatch.setattr(loop, "compute_loss", fake)


@pytest.mark.slow
def test_nonfinite_loss_skip_and_stop(tmp_path, monkeypatch, capsys, recwarn):
    _nan_at(2, monkeypatch)
    out = str(tmp_path / "skip")
    assert train.main(FAST + ["--epochs", "1", "--out", out]) == 0
    assert "non-finite loss (loss nan) at step 2 (epoch 1, batch 2); step skipped" \
        in capsys.readouterr().out
    assert _jsonl(os.path.join(out, "metrics.jsonl"))[0]["skipped"] == 1
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]
    _nan_at(2, monkeypatch)
    stop = str(tmp_path / "stop")
    assert train.main(FAST + ["--epochs", "1", "--nonfinite", "stop", "--out", stop]) == 3
    err = capsys.readouterr().err
    assert "at step 2 (epoch 1, batch 2); stopped" in err
    assert f"no checkpoint has been written to {stop} yet" in err and "is intact" not in err
    _nan_at(3, monkeypatch)
    stop = str(tmp_path / "stop_after_checkpoint")
    assert train.main(FAST + ["--epochs", "1", "--nonfinite", "stop", "--ckpt_every", "2",
                              "--out", stop]) == 3
    err = capsys.readouterr().err
    assert f"at step 3 (epoch 1, batch 3); stopped (--nonfinite stop); the last checkpoint in " \
        f"{stop} is intact" in err
    assert load_checkpoint(stop)["step"] == 2


def test_skip_stops_after_too_many_consecutive_nonfinite_steps(tmp_path, monkeypatch, capsys):
    help_text = " ".join(train.build_parser().format_help().split())
    assert f"stops after {loop.MAX_CONSECUTIVE_NONFINITE} consecutive skipped steps" in help_text
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_NONFINITE", 3)
    real = loop.compute_loss
    calls = {"n": 0}

    def fake(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] in (1, 2, 4, 5, 6, 7) else loss
    monkeypatch.setattr(loop, "compute_loss", fake)
    out = str(tmp_path / "nan")
    assert train.main(FAST + ["--epochs", "2", "--out", out]) == 3
    captured = capsys.readouterr()
    # steps 1-2 skipped, 3 fine (the count restarts), 4-5 skipped, 6 is the third in a row
    assert "at step 5 (epoch 1, batch 5); step skipped (4 skipped so far)" in captured.out
    assert "at step 6 (epoch 1, batch 6); stopped after 3 consecutive non-finite steps" \
        in captured.err
    assert calls["n"] == 6                                      # nothing ran after the stop


def _interrupt_at(monkeypatch, name, call):
    """Ctrl-C, deterministically: ``loop.<name>`` raises KeyboardInterrupt on its ``call``-th
    call (``compute_loss``: once per training step)."""
    real = getattr(loop, name)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt()
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, name, interrupted)


# Where Ctrl-C lands (6 steps per epoch, 2 epochs), what is on disk then, and how to continue.
INTERRUPTS = {
    "step-2-rerun": ("compute_loss", 2, [], "same"),            # before the first checkpoint
    "first-evaluation-resume": ("evaluate", 1, [], "resume"),   # all of epoch 1's steps logged
    "after-mid-epoch-checkpoint": ("compute_loss", 5, ["--ckpt_every", "2"], "resume"),
    "plots-of-epoch-1": ("plot_run", 1, [], "resume"),          # checkpoint of epoch 1 written
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(INTERRUPTS))
def test_interrupt_anywhere_then_rerun_or_resume_ends_like_the_uninterrupted_run(
        where, digits_run, tmp_path, monkeypatch, capsys):
    name, call, extra, how = INTERRUPTS[where]
    out = str(tmp_path / "run")
    command = FAST + ["--epochs", "2", "--out", out] + extra
    _interrupt_at(monkeypatch, name, call)
    assert train.main(command) == 130
    err = capsys.readouterr().err
    if os.path.isfile(os.path.join(out, CKPT_NAME)):
        assert f"interrupted; the last checkpoint is intact: continue with --resume {out}\n" \
            in err
        assert train.main(command) == 2                          # the run is not overwritten
        assert f"--out {out!r} already holds a run" in capsys.readouterr().err
    else:
        assert f"interrupted; no checkpoint was written yet to {out}: start the run again with " \
            f"--resume {out} (from the beginning, same configuration) or the same command" in err
    monkeypatch.undo()
    assert train.main(command if how == "same" else ["--resume", out]) == 0
    summary = capsys.readouterr().out
    assert "summary: 2/2 epochs" in summary and f"files in {out}: checkpoint checkpoint.pt" \
        in summary
    want, got = (_jsonl(os.path.join(d, "metrics.jsonl")) for d in (digits_run, out))
    assert [r["epoch"] for r in got] == [1, 2]
    for a, b in zip(want, got):
        assert b["test_acc"] == a["test_acc"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
    want, got = (_jsonl(os.path.join(d, "steps.jsonl")) for d in (digits_run, out))
    assert [s["step"] for s in got] == list(range(1, 13))
    assert [s["loss"] for s in got] == pytest.approx([s["loss"] for s in want], rel=1e-6)


def test_interrupt_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop.Trainer, "_prepare_out_dir",
                        lambda self, resumed: (_ for _ in ()).throw(KeyboardInterrupt()))
    out = str(tmp_path / "never")
    assert train.main(FAST + ["--out", out]) == 130
    assert "interrupted; nothing was written yet: run the same command again" \
        in capsys.readouterr().err
    assert not os.path.exists(out)


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_interrupted_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch, fail):
    path = tmp_path / CKPT_NAME
    path.write_bytes(b"old")

    def boom(*args):
        raise KeyboardInterrupt() if fail == "fsync" else OSError(28, "No space left on device")
    monkeypatch.setattr(os, fail, boom)
    with pytest.raises(KeyboardInterrupt if fail == "fsync" else OSError):
        atomic_write_bytes(str(path), b"new")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [CKPT_NAME] and path.read_bytes() == b"old"
    atomic_write_bytes(str(path), b"new")
    assert os.listdir(tmp_path) == [CKPT_NAME] and path.read_bytes() == b"new"


def test_out_dir_holding_a_run_or_unusable_is_refused(digits_run, tmp_path, capsys):
    run = str(tmp_path / "existing")
    shutil.copytree(digits_run, run)
    before = {f: (tmp_path / "existing" / f).read_bytes() for f in os.listdir(run)}
    assert train.main(FAST + ["--epochs", "1", "--out", run]) == 2
    err = capsys.readouterr().err
    assert f"--out {run!r} already holds a run (metrics.jsonl, checkpoint.pt); pass --resume " \
        f"{run} to continue it, or choose another --out" in err
    # continuing one run into another run's directory is refused too
    assert train.main(["--resume", digits_run, "--out", run]) == 2
    assert f"--out {run!r} already holds a run" in capsys.readouterr().err
    assert before == {f: (tmp_path / "existing" / f).read_bytes() for f in os.listdir(run)}
    (tmp_path / "a_file").write_text("x")
    for out, match in [(str(tmp_path / "a_file"), "exists and is not a directory"),
                       (str(tmp_path / "a_file" / "x"), "cannot create the output directory")]:
        assert train.main(FAST + ["--epochs", "1", "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"--out {out!r}" in err and match in err and "Traceback" not in err


def test_lm_smoke_with_bf16_autocast_and_jacobian_loss(tmp_path):
    out = str(tmp_path / "lm")
    assert train.main(LM_FAST + ["--epochs", "1", "--bf16", "--jac_loss_weight", "0.1",
                                 "--out", out]) == 0
    rec = _jsonl(os.path.join(out, "metrics.jsonl"))[0]
    assert rec["test_ppl"] > 1 and rec["unigram_loss"] == pytest.approx(3.18, abs=0.05)
    assert rec["f_nfe"] > 0 and torch.isfinite(torch.tensor(rec["train_loss"]))


def _write_corpus(root, short=None):
    """Tiny WikiText-style files: 10 tokens per line (9 words + <eos>); train 400 tokens, valid
    (words w0-w9) and test (w10-w19 and unseen words) 60 each; the ``short`` split 10 tokens."""
    os.makedirs(root, exist_ok=True)
    lines = {"train": [" ".join(f"w{(3 * i + j) % 20}" for j in range(9)) for i in range(40)],
             "valid": [" ".join(f"w{(i + j) % 10}" for j in range(9)) for i in range(6)],
             "test": [" ".join(f"w{10 + (i * j) % 10} zz{j % 3}" for j in range(4)) + " w1"
                      for i in range(6)]}
    if short:
        lines[short] = lines[short][:1]
    for split, text in lines.items():
        with open(os.path.join(root, f"wiki.{split}.tokens"), "w") as fh:
            fh.write("\n".join(text) + "\n")
    return root


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_short_wikitext_split_is_refused_before_training(tmp_path, capsys, split):
    root = _write_corpus(str(tmp_path / "wiki"), short=split)
    out = str(tmp_path / "run")
    assert train.main(LM_FAST + ["--data", "wikitext103", "--data_dir", root, "--out", out]) == 2
    path = os.path.join(root, f"wiki.{split}.tokens")
    assert f"{split} split (file {path}) has 10 tokens (each line end counts as one <eos> " \
        "token); --seq_len 16 needs at least 18" in capsys.readouterr().err
    assert not os.path.exists(out)                              # refused before any training


def test_eval_of_a_language_model_reports_the_test_split(tmp_path, capsys):
    from deq_fast.data import load_wikitext103, unigram_loss
    root = _write_corpus(str(tmp_path / "wiki"))
    out = str(tmp_path / "run")
    assert train.main(LM_FAST + ["--data", "wikitext103", "--data_dir", root, "--epochs", "1",
                                 "--out", out]) == 0
    rec = _jsonl(os.path.join(out, "metrics.jsonl"))[0]         # per epoch: the valid split
    capsys.readouterr()
    results = {}
    for split in ("test", "valid"):
        assert train.eval_main(["--ckpt", out] + (["--split", split] if split == "valid"
                                                  else [])) == 0
        results[split] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert results[split]["split"] == split
    data = load_wikitext103(root)
    assert results["test"]["unigram_loss"] == pytest.approx(unigram_loss(data, "test"))
    assert results["valid"]["unigram_loss"] == pytest.approx(rec["unigram_loss"])
    # keys named by the split measured: the valid split reproduces the epoch's record
    assert "test_loss" not in results["valid"] and "valid_ppl" in results["valid"]
    assert results["valid"]["valid_loss"] == pytest.approx(rec["test_loss"], rel=1e-6)
    assert results["test"]["test_loss"] != pytest.approx(rec["test_loss"], rel=1e-3)


def test_progress_option_and_language_model_perplexity(tmp_path, monkeypatch):
    parse = train.build_parser().parse_args
    assert parse(["--progress", "auto"]).progress == "auto"
    assert parse(["--progress", "TRUE"]).progress is True and parse(["--progress"]).progress
    assert parse(["--progress", "off"]).progress is False
    with pytest.raises(SystemExit):
        parse(["--progress", "sometimes"])

    bars = []

    class Bar:                                                  # records what tqdm would show
        def __init__(self, **kw):
            self.kw, self.postfixes = kw, []
            bars.append(self)

        def set_postfix(self, post, refresh=True):
            self.postfixes.append(dict(post))

        def update(self, n=1):
            pass

        def close(self):
            pass
    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    assert train.main(LM_FAST + ["--epochs", "1", "--progress", "auto",
                                 "--out", str(tmp_path / "lm")]) == 0
    assert len(bars) == 1 and bars[0].kw["disable"] is None     # auto: tqdm decides (terminal)
    assert len(bars[0].postfixes) == 3
    for post in bars[0].postfixes:
        assert float(post["ppl"]) == pytest.approx(math.exp(float(post["loss"])), rel=2e-3)
    vision = EpochStats(loss=2.0, n=4, correct=3, count=4, f_nfe=10, steps=2, skipped=0, res=0.2,
                        n_solve=2).progress_postfix(lm=False)
    assert vision == {"loss": "0.500", "nfe": "5.0", "res": "1.0e-01", "acc": "75.0"}


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync_and_resume(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(loop.__file__))))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "deq_fast.train"]
    common = FAST + ["--epochs", "1", "--out", out]
    r = subprocess.run(cmd + common + ["--max_steps", "3"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    assert len(set(ckpt["param_digests"])) == 1                 # identical on both ranks
    r = subprocess.run(cmd + ["--resume", out], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 6 and ckpt["epoch"] == 1 and len(set(ckpt["param_digests"])) == 1
    assert len(_jsonl(os.path.join(out, "metrics.jsonl"))) == 1  # written once, by rank 0
    assert [s["step"] for s in _jsonl(os.path.join(out, "steps.jsonl"))] == list(range(1, 7))
    # the epoch resumed in its middle is recorded as a whole: same statistics, summed over both
    # ranks and both halves, as an uninterrupted 2-process run
    whole = str(tmp_path / "whole")
    r = subprocess.run(cmd + FAST + ["--epochs", "1", "--out", whole], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = (_jsonl(os.path.join(d, "metrics.jsonl"))[0] for d in (out, whole))
    for key in ("train_loss", "train_acc", "f_nfe", "b_nfe", "residual", "test_acc"):
        assert math.isclose(got[key], want[key], rel_tol=1e-6, abs_tol=1e-9), key


def test_console_script_dispatch(capsys, digits_run):
    assert cli.main(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert cli.main([]) == 0 and "usage: deq-fast" in capsys.readouterr().out   # bare: help, no run
    assert cli.main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert cli.main(["eval", "--ckpt", digits_run]) == 0
    assert '"test_acc"' in capsys.readouterr().out


def test_mdeq_tiny_on_cifar10_files(tmp_path):
    """The CIFAR-10 path end to end (uint8 batches, normalisation, crop+flip) on tiny files."""
    import pickle

    import numpy as np
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


def test_every_option_shows_its_default_or_the_rule_per_model():
    for parser in (train.build_parser(), cli.build_eval_parser()):
        for action in parser._actions:
            if action.dest not in ("help", "ckpt"):
                assert "default" in (action.help or ""), (parser.prog, action.dest)
    help_text = " ".join(train.build_parser().format_help().split())
    epochs = {m: get_config(m)["train"]["epochs"] for m in ("mdeq-digits", "deq-lm-small")}
    assert f"mdeq-digits {epochs['mdeq-digits']}," in help_text
    assert f"deq-lm-small {epochs['deq-lm-small']}" in help_text
    assert "--seed SEED default: 0" in help_text and "(default: mdeq-digits)" in help_text


def test_resuming_a_finished_run_says_so_and_how_to_extend_it(digits_run, capsys, monkeypatch):
    monkeypatch.setattr(loop, "run_training", None)             # calling it would fail
    assert train.main(["--resume", digits_run]) == 0
    out = capsys.readouterr().out
    assert f"the run in {digits_run} is already finished (2 of 2 epochs); to train it further " \
        f"pass a larger --epochs, e.g. --resume {digits_run} --epochs 12" in out
    final = _jsonl(os.path.join(digits_run, "metrics.jsonl"))[-1]
    assert "summary: 2/2 epochs" in out
    assert f"test accuracy: final {100 * final['test_acc']:.2f}% (epoch 2)" in out


def test_summary_names_best_and_final_results_and_the_files(tmp_path):
    from deq_fast.train.summary import run_summary
    (tmp_path / CKPT_NAME).write_bytes(b"x")
    (tmp_path / "curves.png").write_bytes(b"x")
    vision = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.9},
              {"epoch": 3, "test_acc": 0.8}]
    text = run_summary(vision, str(tmp_path), 61.25, 5)
    assert text.splitlines() == [
        "summary: 3/5 epochs, wall time 61.2 s",
        "  test accuracy: final 80.00% (epoch 3), best 90.00% (epoch 2)",
        f"  files in {tmp_path}: checkpoint checkpoint.pt; plots curves.png"]
    lm = [{"epoch": 1, "test_loss": 2.0, "test_ppl": math.exp(2.0)},
          {"epoch": 2, "test_loss": None, "test_ppl": None}]
    assert "validation loss: final not finite (epoch 2), best 2.0000, perplexity 7.39 " \
        "(epoch 1)" in run_summary(lm, str(tmp_path), 1.0, 2)
    assert "no epoch finished yet" in run_summary([], str(tmp_path), 0.0, 2)


def test_wrong_files_given_to_resume_are_named(digits_run, tmp_path, capsys):
    import collections
    junk = tmp_path / "notes.txt"
    junk.write_text("not a checkpoint")
    state_dict = str(tmp_path / "weights.pt")
    torch.save({"w": torch.zeros(2)}, state_dict)
    pickled = str(tmp_path / "object.pt")
    torch.save(collections.OrderedDict(w=torch.nn.Linear(2, 2)), pickled)   # a module: pickle
    config = os.path.join(digits_run, "config.json")
    expected = "expected a run directory of deq-fast train or its checkpoint.pt"
    for path, what in [
            (config, f"is a run's configuration, not its checkpoint; pass the run directory: "
                     f"--resume {digits_run}"),
            (str(junk), f"is corrupt or truncated, or not a PyTorch file; {expected}"),
            (state_dict, "is a PyTorch file but not a checkpoint of deq-fast train (no format "),
            (pickled, "is a PyTorch file that is not a checkpoint of deq-fast train (it holds "
                      "Python objects other than tensors"),
            (str(tmp_path), f"no checkpoint.pt in this directory; {expected}")]:
        assert train.main(["--resume", path]) == 2
        err = capsys.readouterr().err
        assert f"--resume {path!r}" in err and what in err and "weights_only" not in err, err
    assert train.eval_main(["--ckpt", str(junk)]) == 2
    assert f"--ckpt {str(junk)!r} is corrupt" in capsys.readouterr().err


def test_missing_extension_is_reported_when_training_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "extension_status", lambda: (False, "deq_fast._C not built (x)"))
    assert train.main(FAST + ["--max_steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert "note: deq_fast._C not built (x)" in capsys.readouterr().out


@pytest.mark.slow
def test_real_ctrl_c_in_the_first_epoch_then_the_same_command_works(tmp_path):
    """SIGINT to a real ``python -m deq_fast.train`` once it prints its first line (the run
    directory exists, no checkpoint yet): exit 130 with the way to continue, and the same command
    then trains the run to its end."""
    import signal
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "deq_fast.train"] + FAST + ["--epochs", "1", "--out", out]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    first = proc.stdout.readline()
    assert first.startswith("training mdeq-digits"), first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; " in err and "Traceback" not in err
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "summary: 1/1 epochs" in r.stdout
    assert load_checkpoint(out)["epoch"] == 1


def test_records_without_a_checkpoint_are_neither_overwritten_nor_resumed(digits_run, tmp_path,
                                                                         capsys):
    run = str(tmp_path / "lost")
    shutil.copytree(digits_run, run)
    os.remove(os.path.join(run, CKPT_NAME))
    for argv in (FAST + ["--out", run], ["--resume", run]):
        assert train.main(argv) == 2
        assert f"--out {run!r} holds the epoch records of a run whose checkpoint.pt is missing" \
            in capsys.readouterr().err


def test_epoch_line_shows_no_nan_residual_during_the_warm_up():
    assert loop._residual_text(float("nan")) == "-"
    assert loop._residual_text(3.3e-4) == "3.30e-04"
