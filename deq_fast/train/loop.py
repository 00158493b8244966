"""Train and evaluate DEQ models: ``deq-fast train ...`` / ``python -m deq_fast.train ...``.

With no arguments this trains ``mdeq-digits`` on the handwritten digits that ship with scikit-learn
(a held-out fifth of each class is the test set) and writes to ``runs/<model>-<timestamp>``:

* ``metrics.jsonl``  one record per epoch: ``epoch, step, train_loss, train_acc, test_acc`` (or
  ``test_loss, test_ppl, unigram_loss`` for language models), ``f_nfe, b_nfe, residual, lr,
  seconds, elapsed, skipped, residual_trace`` (mean forward residual per solver iteration, last
  training batch of the epoch);
* ``steps.jsonl``    one record per step: ``step, epoch, loss, f_nfe, b_nfe, residual``;
* ``checkpoint.pt``  model, optimizer, scheduler, RNG states of every rank, position in the data
  order, the current epoch's statistics so far, configuration; written to a temporary file and
  renamed, so it is never half-written;
* ``curves.png``, ``residuals.png`` training curves and solver residual traces.

``--resume DIR`` continues exactly where the checkpoint stopped (same data order, dropout masks and
optimizer state: the next step's loss equals the uninterrupted run's; an epoch resumed in its
middle is recorded as a whole). ``--out`` refuses a directory that already holds a run, so a new
run never overwrites one. Options that define the run (model, data, solver, learning rate, ...)
must match the checkpoint; a mismatch is refused with the difference named. Multi-process:
``torchrun --nproc_per_node=N -m deq_fast.train ...`` trains with DistributedDataParallel (gloo on
CPU, NCCL on GPU); ``--batch_size`` is the global batch.

Solver and gradient options keep TorchDEQ's names (``--f_solver --f_max_iter --f_tol
--f_stop_mode --b_solver --b_max_iter --b_tol --b_stop_mode --ift --grad --jac_loss_weight``);
defaults come from the model's configuration (:mod:`deq_fast.models.configs`).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from deq_fast.data import DATASETS, LMData, VisionData, lm_windows, load_data, unigram_loss
from deq_fast.models import DEQ_IMPLS, MODEL_CONFIGS, build_model, get_config

__all__ = ["main", "eval_main", "run_training", "evaluate_checkpoint", "build_parser",
           "TrainingError"]

CKPT_NAME = "checkpoint.pt"
CKPT_FORMAT = "deq_fast.train/1"
SOLVERS = ("anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter")
# backward solvers: TorchDEQ's names, plus deq_fast's GMRES and its automatic choice
B_SOLVERS = SOLVERS + ("gmres", "auto")
DEFAULT_DEQ_IMPL = "deq_fast"
# With --nonfinite skip, stop after this many consecutive non-finite steps: the weights or the
# optimizer state are then most likely non-finite, and every later step would be skipped.
MAX_CONSECUTIVE_NONFINITE = 20

# Options a resumed run may change; every other option must match the checkpoint.
RESUMABLE_CHANGES = {"epochs", "out", "device", "num_threads", "max_steps", "ckpt_every",
                     "data_dir", "nonfinite", "progress"}
# Defaults that do not depend on the model.
GLOBAL_DEFAULTS: dict[str, Any] = dict(
    model="mdeq-digits", data_dir=None, seed=0, device="auto", bf16=False, nonfinite="skip",
    jac_loss_weight=0.0, grad_clip=1.0, deq_impl=DEFAULT_DEQ_IMPL, num_threads=0, max_steps=0,
    ckpt_every=0, progress="auto", augment=True, label_smoothing=0.0, seq_len=64, steps_per_epoch=100, eval_batches=0)


class TrainingError(RuntimeError):
    """A run that cannot start or continue (message names the cause); exit code 2."""


class NonFiniteLoss(TrainingError):
    """A non-finite loss or gradient with ``--nonfinite stop``."""


# --------------------------------------------------------------------------------------- options
def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _progress(text: str) -> bool | str:
    """``--progress``: ``auto`` (bars only on a terminal) or a boolean."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return _bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}") from None


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _nonneg(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` option parser; every default is ``SUPPRESS`` so explicit options are known."""
    p = argparse.ArgumentParser(
        prog="deq-fast train", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        description="Train a DEQ model. No arguments: MDEQ on the embedded digits.")
    g = p.add_argument_group("run")
    g.add_argument("--model", choices=sorted(MODEL_CONFIGS), help="model configuration "
                   "(default mdeq-digits)")
    g.add_argument("--data", choices=sorted(DATASETS), help="data set (default: the model's)")
    g.add_argument("--data_dir", help="directory of the files for cifar10 / wikitext103")
    g.add_argument("--out", help="output directory (default runs/<model>-<timestamp>); a "
                   "directory that already holds a run is refused (continue it with --resume)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or a checkpoint file)")
    g.add_argument("--epochs", type=_positive(int))
    g.add_argument("--batch_size", type=_positive(int), help="global batch size")
    g.add_argument("--lr", type=_positive(float))
    g.add_argument("--weight_decay", type=_nonneg(float))
    g.add_argument("--label_smoothing", type=_nonneg(float), help="of the training loss")
    g.add_argument("--grad_clip", type=_nonneg(float), help="max gradient norm, 0 = off")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--bf16", type=_bool, nargs="?", const=True, help="bf16 autocast for f and head")
    g.add_argument("--num_threads", type=_nonneg(int), help="CPU threads, 0 = cores / processes")
    g.add_argument("--nonfinite", choices=("skip", "stop"),
                   help="on a non-finite loss or gradient: skip the step (default; the run stops "
                   f"after {MAX_CONSECUTIVE_NONFINITE} consecutive skipped steps) or stop")
    g.add_argument("--pretrain_steps", type=_nonneg(int),
                   help="warm-up steps with unrolled weight-tied layers before the DEQ solve")
    g.add_argument("--max_steps", type=_nonneg(int), help="stop (and checkpoint) after this "
                   "global step, 0 = run all epochs")
    g.add_argument("--ckpt_every", type=_nonneg(int), help="also checkpoint every N steps")
    g.add_argument("--progress", type=_progress, nargs="?", const=True,
                   help="tqdm progress bars: auto (default: only on a terminal), true or false")
    g.add_argument("--augment", type=_bool, nargs="?", const=True,
                   help="random affine jitter (digits) / crops and flips (CIFAR-10) of training "
                   "images")
    g.add_argument("--deq_impl", choices=DEQ_IMPLS, help="DEQ implementation (torchdeq = baseline)")
    g = p.add_argument_group("language models")
    g.add_argument("--seq_len", type=_positive(int))
    g.add_argument("--steps_per_epoch", type=_positive(int))
    g.add_argument("--eval_batches", type=_nonneg(int), help="cap on evaluation batches, 0 = all")
    g = p.add_argument_group("solver and gradient (TorchDEQ names)")
    g.add_argument("--f_solver", choices=SOLVERS)
    g.add_argument("--f_max_iter", type=_positive(int))
    g.add_argument("--f_tol", type=_positive(float))
    g.add_argument("--f_stop_mode", choices=("abs", "rel"))
    g.add_argument("--b_solver", choices=B_SOLVERS,
                   help="backward solver (gmres and auto: deq_fast only)")
    g.add_argument("--b_max_iter", type=_positive(int))
    g.add_argument("--b_tol", type=_positive(float))
    g.add_argument("--b_stop_mode", choices=("abs", "rel"))
    g.add_argument("--ift", type=_bool, nargs="?", const=True,
                   help="exact implicit gradient (true) or phantom gradient of --grad steps")
    g.add_argument("--grad", type=_positive(int), help="phantom-gradient steps when --ift false")
    g.add_argument("--jac_loss_weight", type=_nonneg(float),
                   help="weight of the Jacobian (Frobenius) regulariser")
    return p


def resolve_config(explicit: dict[str, Any]) -> dict[str, Any]:
    """Full configuration: explicit options > the model's training defaults > global defaults."""
    model = explicit.get("model", GLOBAL_DEFAULTS["model"])
    cfg = dict(GLOBAL_DEFAULTS)
    cfg.update(get_config(model)["train"])
    cfg.update({k: v for k, v in explicit.items() if k not in ("resume",)})
    cfg["model"] = model
    return cfg


def _validate(cfg: dict[str, Any]) -> None:
    kind = get_config(cfg["model"])["kind"]
    data_kind, needs_dir = DATASETS[cfg["data"]]
    if (kind == "mdeq") != (data_kind == "vision"):
        wanted = sorted(n for n, (k, _) in DATASETS.items() if (k == "vision") == (kind == "mdeq"))
        raise TrainingError(f"--model {cfg['model']} needs data among {wanted}, got --data "
                            f"{cfg['data']}")
    if needs_dir and not cfg.get("data_dir"):
        raise TrainingError(f"--data {cfg['data']} reads files from disk: pass --data_dir DIR")
    if cfg["deq_impl"] != "deq_fast" and cfg["b_solver"] not in SOLVERS:
        raise TrainingError(f"--b_solver {cfg['b_solver']} is a deq_fast backward solver; with "
                            f"--deq_impl {cfg['deq_impl']} use one of {list(SOLVERS)}")


def _deq_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    keys = ("f_solver", "f_max_iter", "f_tol", "f_stop_mode", "b_solver", "b_max_iter", "b_tol",
            "b_stop_mode", "ift", "grad")
    out = {k: cfg[k] for k in keys}
    if cfg["deq_impl"] == "deq_fast" and not cfg["ift"]:
        out["grad_mode"] = "phantom"   # deq_fast's default is the exact gradient; TorchDEQ's not
    return out


# ------------------------------------------------------------------------------------ utilities
class _Dist:
    """Process-group facts; world size 1 without torchrun."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.enabled = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def all_true(self, flag: bool, device: torch.device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _pick_device(name: str, dd: _Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"--device {name!r} is not a device (expected auto, cpu, cuda, "
                            "cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {name}: CUDA is not available on this machine")
        if dd.enabled:
            device = torch.device("cuda", dd.local_rank)
    elif device.type != "cpu":
        raise TrainingError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4]))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``path`` through a temporary file and a rename; the temporary file is removed if
    anything (an error, Ctrl-C) interrupts the write, and ``path`` keeps its old content."""
    tmp = f"{path}.tmp.{os.getpid()}"
    renamed = False
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        renamed = True
    finally:
        if not renamed:
            try:
                os.remove(tmp)
            except OSError:
                pass


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a training checkpoint (a file, or a run directory holding ``checkpoint.pt``).

    Raises:
        TrainingError: missing, truncated/corrupt, or not a deq_fast training checkpoint.
    """
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.isfile(path):
        raise TrainingError(f"no checkpoint at {path!r} (expected a run directory holding "
                            f"{CKPT_NAME} or the file itself)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip/pickle data
        raise TrainingError(f"checkpoint {path!r} is corrupt or truncated "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TrainingError(f"{path!r} is not a deq_fast training checkpoint "
                            f"(expected format {CKPT_FORMAT!r})")
    return ckpt


def _param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters' bytes: equal across DDP ranks iff the weights are identical."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps({k: _finite_or_none(v) for k, v in r.items()}) + "\n"
                   for r in records)
    _atomic_write_bytes(path, text.encode())


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _info_stats(info: dict, stop_mode: str) -> tuple[float, float, list[float]]:
    """Mean forward NFE, mean lowest residual and the batch-mean residual trace of a solve."""
    if not info or "nstep" not in info:
        return float("nan"), float("nan"), []
    nfe = float(torch.as_tensor(info["nstep"]).float().mean())
    key = "rel" if stop_mode == "rel" else "abs"
    res = float(torch.as_tensor(info[f"{key}_lowest"]).float().mean())
    trace = info.get(f"{key}_trace")
    trace_list: list[float] = []
    if trace is not None and torch.is_tensor(trace) and trace.numel():
        t = trace.float()
        trace_list = (t.mean(0) if t.dim() == 2 else t).tolist()
    return nfe, res, trace_list


def _backward_stats(binfo: dict) -> tuple[float, float]:
    """Backward evaluations (VJPs) and mean relative residual of one backward solve.

    deq_fast reports ``nvjp``/``rel_residual``; TorchDEQ's solvers ``nstep``/``rel_lowest``.
    """
    nfe = binfo.get("nvjp", binfo.get("nstep"))
    res = binfo.get("rel_residual", binfo.get("rel_lowest"))
    nfe = float(torch.as_tensor(nfe).float().mean()) if nfe is not None else float("nan")
    res = float(torch.as_tensor(res).float().mean()) if res is not None else float("nan")
    return nfe, res


def _compute_loss(logits: torch.Tensor, target: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for classification ``(B, K)`` or language modelling ``(B, L, V)``."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           label_smoothing=label_smoothing)


# --------------------------------------------------------------------------------------- batches
def _vision_batches(data: VisionData, cfg: dict, epoch: int, dd: _Dist) -> list[torch.Tensor]:
    from torch.utils.data.distributed import DistributedSampler
    sampler = DistributedSampler(range(len(data.y_train)), num_replicas=dd.world, rank=dd.rank,
                                 shuffle=True, seed=cfg["seed"])
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler))
    per_rank = cfg["batch_size"] // dd.world
    return list(torch.split(idx, per_rank))


def _lm_batches(data: LMData, cfg: dict, epoch: int, dd: _Dist) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(cfg["seed"] * 100_003 + epoch)
    per_rank = cfg["batch_size"] // dd.world
    high = len(data.train) - cfg["seq_len"] - 1
    starts = torch.randint(0, high, (cfg["steps_per_epoch"], dd.world, per_rank), generator=g)
    return list(starts[:, dd.rank])


def _augment(x: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (zero fill) and optional horizontal flip.

    Draws from the global torch RNG, which checkpoints save and restore.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (b, 2))
    out = torch.stack([padded[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w]
                       for i in range(b)])
    if flip:
        mirror = torch.rand(b) < 0.5
        out[mirror] = out[mirror].flip(-1)
    return out


def _affine_augment(x: torch.Tensor, degrees: float, scale: float, shift_px: float) -> torch.Tensor:
    """Random rotation (+-``degrees``), zoom (1 +- ``scale``) and translation (+- ``shift_px``
    pixels) per image, bilinear, edges replicated (the digits' border is background)."""
    b, _, h, w = x.shape
    ang = (torch.rand(b) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(b) * 2 - 1) * scale
    shift = (torch.rand(b, 2) * 2 - 1) * shift_px * 2 / torch.tensor([w, h])
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _get_batch(data, cfg: dict, idx: torch.Tensor, device: torch.device, train: bool,
               split: str = "valid"):
    """A batch of the training split, or of the held-out ``split`` of a language corpus (vision
    data sets have one held-out split, the test split)."""
    if isinstance(data, VisionData):
        x = data.x_train[idx] if train else data.x_test[idx]
        y = data.y_train[idx] if train else data.y_test[idx]
        x = data.transform(x)
        if train and cfg["augment"]:
            # digits: small rotations, zooms and shifts (a mirrored digit is another symbol);
            # CIFAR-10: the standard 4-pixel crop and horizontal flip
            x = (_affine_augment(x, 12.0, 0.1, 1.0) if data.name == "digits"
                 else _augment(x, 4, True))
        return x.to(device), y.to(device)
    tokens = data.train if train else getattr(data, split)
    x, y = lm_windows(tokens, idx, cfg["seq_len"])
    return x.to(device), y.to(device)


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def _evaluate(model, data, cfg: dict, device: torch.device, dd: _Dist, unrolled: bool,
              split: str = "valid") -> dict:
    """Test accuracy (vision) or loss/perplexity on ``split`` (LM), summed over ranks."""
    model.eval()
    per_rank = max(1, cfg["batch_size"] // dd.world)
    if isinstance(data, VisionData):
        all_idx = torch.arange(len(data.y_test))
    else:
        L = cfg["seq_len"]
        all_idx = torch.arange(0, len(getattr(data, split)) - L - 1, L)
    batches = list(torch.split(all_idx[dd.rank::dd.world], per_rank))
    if cfg.get("eval_batches"):
        batches = batches[: cfg["eval_batches"]]
    loss_sum = correct = count = nfe_sum = res_sum = n_solves = 0.0
    trace: list[float] = []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg["bf16"]))
    for idx in batches:
        x, y = _get_batch(data, cfg, idx, device, train=False, split=split)
        with amp:
            logits, info = model(x, unrolled=unrolled)
        loss_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                          y.reshape(-1), reduction="sum"))
        count += y.numel()
        if isinstance(data, VisionData):
            correct += float((logits.argmax(-1) == y).sum())
        nfe, res, tr = _info_stats(info, cfg["f_stop_mode"])
        if math.isfinite(nfe):
            nfe_sum += nfe
            res_sum += res
            n_solves += 1
            trace = tr
    loss_sum, correct, count, nfe_sum, res_sum, n_solves = dd.sum(
        [loss_sum, correct, count, nfe_sum, res_sum, n_solves], device)
    out = {"test_loss": loss_sum / max(count, 1),
           "test_f_nfe": nfe_sum / n_solves if n_solves else float("nan"),
           "test_residual": res_sum / n_solves if n_solves else float("nan"),
           "test_residual_trace": trace}
    if isinstance(data, VisionData):
        out["test_acc"] = correct / max(count, 1)
    else:
        out["test_ppl"] = math.exp(min(out["test_loss"], 50.0))
    model.train()
    return out


# ------------------------------------------------------------------------------------------ plots
def _plot(out_dir: str, records: list[dict[str, Any]]) -> None:
    """``curves.png`` (loss, test metric, NFE per epoch) and ``residuals.png`` (solver traces)."""
    if not records:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if len(records) == 1:
            print("note: matplotlib is not installed; no PNG plots (metrics.jsonl has the data)",
                  file=sys.stderr)
        return

    ep = [r["epoch"] for r in records]
    val = lambda k: [r.get(k) if r.get(k) is not None else float("nan") for r in records]  # noqa
    metric = "test_acc" if "test_acc" in records[-1] else "test_loss"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, val("train_loss"), "o-", label="train")
    if metric == "test_loss":
        axes[0].plot(ep, val("test_loss"), "s-", label="validation")
        if records[-1].get("unigram_loss") is not None:
            axes[0].axhline(records[-1]["unigram_loss"], ls="--", c="gray", label="unigram")
        axes[1].plot(ep, val("test_ppl"), "s-")
        axes[1].set_ylabel("validation perplexity")
    else:
        axes[1].plot(ep, [100 * v for v in val("test_acc")], "s-", label="test")
        axes[1].plot(ep, [100 * v for v in val("train_acc")], "o-", label="train")
        axes[1].set_ylabel("accuracy (%)")
        axes[1].legend()
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[2].plot(ep, val("f_nfe"), "o-", label="forward NFE")
    axes[2].plot(ep, val("b_nfe"), "s-", label="backward NFE")
    axes[2].set_ylabel("evaluations per step")
    axes[2].legend()
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, os.path.join(out_dir, "curves.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    cmap = plt.get_cmap("viridis")
    for r in records:
        c = cmap(r["epoch"] / max(ep[-1], 1))
        for ax, key in ((axes[0], "residual_trace"), (axes[1], "test_residual_trace")):
            tr = r.get(key) or []
            # Entry 1 of an Anderson trace is a placeholder (1e8, TorchDEQ's convention, kept by
            # deq_fast); the curve starts at iteration 2.
            pts = [(i + 1, v) for i, v in enumerate(tr) if i > 0 and v is not None and v > 0]
            if pts:
                ax.semilogy(*zip(*pts), color=c, label=f"epoch {r['epoch']}")
    for ax, title in ((axes[0], "training solves"), (axes[1], "evaluation solves")):
        ax.set_title(title)
        ax.set_xlabel("solver iteration")
        ax.set_ylabel("mean residual")
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles[-6:], labels[-6:], fontsize=7)
    fig.tight_layout()
    _save_fig(fig, os.path.join(out_dir, "residuals.png"))
    plt.close(fig)


def _save_fig(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------- training
def _build(cfg: dict, data, device: torch.device):
    kind = get_config(cfg["model"])["kind"]
    kwargs: dict[str, Any] = dict(deq_kwargs=_deq_kwargs(cfg), deq_impl=cfg["deq_impl"])
    if kind == "mdeq":
        kwargs.update(num_classes=data.num_classes, in_channels=data.in_channels)
    else:
        if cfg["seq_len"] > get_config(cfg["model"])["arch"]["max_len"]:
            raise TrainingError(f"--seq_len {cfg['seq_len']} exceeds {cfg['model']}'s max_len "
                                f"{get_config(cfg['model'])['arch']['max_len']}")
        kwargs.update(vocab_size=data.vocab_size)
    return build_model(cfg["model"], **kwargs).to(device)


def _make_optim(model, cfg: dict, steps_per_epoch: int):
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    total = max(1, cfg["epochs"] * steps_per_epoch)
    # Cosine decay over the whole run (the reference schedule); a resumed run with a different
    # --epochs follows the new length from its current step.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def _load_data(cfg: dict):
    try:
        return load_data(cfg["data"], cfg.get("data_dir"))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise TrainingError(str(exc)) from exc


def _check_lm_splits(data, cfg: dict, splits: tuple[str, ...]) -> None:
    """Refuse token streams too short for one ``--seq_len`` window (input plus shifted target)
    before any work: training draws window starts in ``[0, T - seq_len - 1)`` and evaluation
    steps through the same range, so a split needs ``seq_len + 2`` tokens."""
    if not isinstance(data, LMData):
        return
    need = cfg["seq_len"] + 2
    for split in splits:
        n = len(getattr(data, split))
        if n < need:
            where = (f"file {data.files[split]}" if data.files and split in data.files
                     else f"corpus {data.name}")
            eos = " (each line end counts as one <eos> token)" if data.itos is not None else ""
            raise TrainingError(f"{split} split ({where}) has {n} tokens{eos}; --seq_len "
                                f"{cfg['seq_len']} needs at least {need}: use a longer file or a "
                                "smaller --seq_len")


def _check_out_dir(out_dir: str) -> None:
    """Refuse to start a run in a directory that already holds one (it would be overwritten)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainingError(f"--out {out_dir!r} exists and is not a directory; expected a "
                            "directory path (created if missing)")
    found = [f for f in ("metrics.jsonl", CKPT_NAME) if os.path.isfile(os.path.join(out_dir, f))]
    if found:
        raise TrainingError(f"--out {out_dir!r} already holds a run ({', '.join(found)}); pass "
                            f"--resume {out_dir} to continue it, or choose another --out")


def _print(*args: Any) -> None:
    print(*args, flush=True)


def run_training(cfg: dict[str, Any], out_dir: str, resume: dict[str, Any] | None = None,
                 log=_print) -> dict[str, Any]:
    """Train according to a resolved configuration (see :func:`resolve_config`).

    Args:
        cfg: full configuration dict (options of ``deq-fast train``).
        out_dir: where metrics, checkpoint and plots go (created).
        resume: a loaded checkpoint to continue from, or None.
        log: function for progress lines (rank 0 only).

    Returns:
        the last epoch's metrics record (``{}`` if no epoch finished), plus ``stopped_at_step``
        when ``max_steps`` ended the run early.

    Raises:
        TrainingError: bad configuration or data (before training), or ``--nonfinite stop``.
    """
    with warnings.catch_warnings():
        # An unconverged backward solve is expected early in training; it is reported per epoch
        # as ``b_residual`` in metrics.jsonl instead of one warning per step.
        warnings.filterwarnings("ignore", message="DEQ backward solve")
        return _run_training(cfg, out_dir, resume, log)


def _run_training(cfg: dict[str, Any], out_dir: str, resume: dict[str, Any] | None,
                  log) -> dict[str, Any]:
    dd = _Dist()
    _validate(cfg)
    if cfg["batch_size"] % dd.world:
        raise TrainingError(f"--batch_size {cfg['batch_size']} is the global batch and must be "
                            f"divisible by the number of processes ({dd.world})")
    device = _pick_device(cfg["device"], dd)
    if resume is None:
        _check_out_dir(out_dir)
    threads = cfg["num_threads"] or max(1, (os.cpu_count() or 1) // max(dd.local_world, 1))
    torch.set_num_threads(threads)
    data = _load_data(cfg)
    _check_lm_splits(data, cfg, ("train", "valid", "test"))
    dd.init(device)
    log = log if dd.main else (lambda *a, **k: None)

    _seed_all(cfg["seed"])
    model = _build(cfg, data, device)
    if isinstance(data, VisionData):
        per_rank = cfg["batch_size"] // dd.world
        n_local = math.ceil(len(data.y_train) / dd.world)
        steps_per_epoch = math.ceil(n_local / per_rank)
        unigram = None
    else:
        steps_per_epoch = cfg["steps_per_epoch"]
        unigram = unigram_loss(data)
    opt, sched = _make_optim(model, cfg, steps_per_epoch)
    step, epoch, batch_in_epoch = 0, 0, 0
    records: list[dict[str, Any]] = []
    partial: dict[str, Any] | None = None     # statistics of the interrupted epoch's first part
    if resume is not None:
        try:
            model.load_state_dict(resume["model"])
        except RuntimeError as exc:
            raise TrainingError(f"checkpoint weights do not fit {cfg['model']}: "
                                f"{str(exc)[:300]}") from exc
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        step, epoch, batch_in_epoch = resume["step"], resume["epoch"], resume["batch_in_epoch"]
        records = [r for r in resume["metrics"] if r["epoch"] < epoch + 1]
        partial = resume.get("epoch_partial") if batch_in_epoch else None
        rngs = resume["rng"]
        if len(rngs) != dd.world:
            log(f"note: checkpoint written by {len(rngs)} process(es), resuming with {dd.world}: "
                "data order and dropout masks will differ from an uninterrupted run")
        _set_rng_state(rngs[dd.rank % len(rngs)])
    elif dd.enabled:
        torch.manual_seed(cfg["seed"] + 7919 * dd.rank)   # different dropout masks per rank
    ddp_model = model
    if dd.enabled:
        from torch.nn.parallel import DistributedDataParallel
        ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if dd.main:
        try:
            os.makedirs(out_dir, exist_ok=True)
            _atomic_write_bytes(os.path.join(out_dir, "config.json"),
                                json.dumps(cfg, indent=1, default=str).encode())
        except OSError as exc:
            raise TrainingError(f"--out {out_dir!r}: cannot create the output directory or write "
                                f"to it ({exc.strerror or exc}); expected a writable directory "
                                "path") from exc
        _write_jsonl(os.path.join(out_dir, "metrics.jsonl"), records)
        steps_path = os.path.join(out_dir, "steps.jsonl")
        _write_jsonl(steps_path, [r for r in _read_jsonl(steps_path) if r["step"] <= step]
                     if resume is not None else [])
    ckpt_path = os.path.join(out_dir, CKPT_NAME)

    def checkpoint(epoch_: int, batch_: int, epoch_sums: dict[str, float] | None = None,
                   trace: list[float] | None = None, seconds: float = 0.0) -> None:
        """Save the run; mid-epoch (``batch_ > 0``) also the epoch's statistics so far, summed
        over ranks, so a resumed run's epoch record covers the whole epoch."""
        rngs = dd.gather(_rng_state())
        prints = dd.gather(_param_digest(model))
        if len(set(prints)) > 1:
            raise TrainingError(f"parameters differ across processes at step {step} "
                                f"(digests {prints}); DistributedDataParallel lost sync")
        part = None
        if batch_ and epoch_sums is not None:
            keys = list(epoch_sums)
            part = {"sums": dict(zip(keys, dd.sum([epoch_sums[k] for k in keys], device))),
                    "residual_trace": list(trace or []), "seconds": seconds}
        if dd.main:
            _save_checkpoint(ckpt_path, {
                "format": CKPT_FORMAT, "config": cfg, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs,
                "step": step, "epoch": epoch_, "batch_in_epoch": batch_, "metrics": records,
                "world_size": dd.world, "param_digests": prints, "epoch_partial": part,
                "elapsed": time.time() - t_start})
        dd.barrier()

    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(cfg["bf16"]))
    params = [p for p in model.parameters() if p.requires_grad]
    # Checkpoints without "elapsed" (older format) resume from the last epoch record's time.
    elapsed = (resume.get("elapsed") if resume is not None else None)
    if elapsed is None:
        elapsed = records[-1]["elapsed"] if records else 0.0
    t_start = time.time() - elapsed
    n_skipped = sum(r.get("skipped", 0) for r in records)
    if partial is not None:
        n_skipped += int(partial["sums"].get("skipped", 0))
    n_bad_in_row = 0          # consecutive non-finite steps
    stopped = None
    log(f"training {cfg['model']} on {cfg['data']} ({sum(p.numel() for p in params):,} "
        f"parameters, {dd.world} process(es), {threads} thread(s) each, device {device}, "
        f"deq_impl {cfg['deq_impl']}) -> {out_dir}")
    while epoch < cfg["epochs"] and stopped is None:
        t_epoch = time.time()
        batches = (_vision_batches(data, cfg, epoch, dd) if isinstance(data, VisionData)
                   else _lm_batches(data, cfg, epoch, dd))
        sums = dict(loss=0.0, correct=0.0, count=0.0, n=0.0, f_nfe=0.0, b_nfe=0.0, res=0.0,
                    n_solve=0.0, skipped=0.0, b_res=0.0, n_bsolve=0.0, steps=0.0)
        last_trace: list[float] = []
        if partial is not None:
            # Resumed mid-epoch: the epoch's totals so far (over all ranks) start on rank 0.
            if dd.main:
                sums.update({k: float(v) for k, v in partial["sums"].items() if k in sums})
                last_trace = list(partial["residual_trace"])
            t_epoch -= partial["seconds"]
            partial = None
        # (an older checkpoint without them: the epoch record covers the batches after resume)
        bar = None
        if cfg["progress"] and dd.main:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(batches), initial=batch_in_epoch, desc=f"epoch {epoch + 1}",
                       leave=False, dynamic_ncols=True, file=sys.stderr,
                       disable=None if cfg["progress"] == "auto" else not cfg["progress"])
        step_log = []
        for b in range(batch_in_epoch, len(batches)):
            x, y = _get_batch(data, cfg, batches[b], device, train=True)
            step += 1
            sums["steps"] += 1
            unrolled = step <= cfg["pretrain_steps"]
            b_info: list[dict] = []
            with amp:
                logits, info = ddp_model(x, unrolled=unrolled,
                                         jac_loss=cfg["jac_loss_weight"] > 0 and not unrolled,
                                         backward_writer=b_info.append)
            loss = _compute_loss(logits, y, cfg["label_smoothing"])
            total = loss + cfg["jac_loss_weight"] * info["jac_loss"] if "jac_loss" in info else loss
            ok = dd.all_true(bool(torch.isfinite(total)), device)
            opt.zero_grad(set_to_none=True)
            if ok:
                total.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(
                    params, cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
                ok = bool(torch.isfinite(gnorm))      # DDP gradients are identical on all ranks
                what = "gradient"
            else:
                what = "loss"
            if not ok:
                n_bad_in_row += 1
                msg = (f"non-finite {what} (loss {total.detach().item():.4g}) at step {step} "
                       f"(epoch {epoch + 1}, batch {b + 1})")
                saved = (f"the last checkpoint in {out_dir} is intact"
                         if os.path.isfile(ckpt_path) else
                         f"no checkpoint has been written to {out_dir} yet")
                if cfg["nonfinite"] == "stop":
                    raise NonFiniteLoss(msg + f"; stopped (--nonfinite stop); {saved}")
                if n_bad_in_row >= MAX_CONSECUTIVE_NONFINITE:
                    raise NonFiniteLoss(
                        msg + f"; stopped after {n_bad_in_row} consecutive non-finite steps "
                        "(--nonfinite skip gives up: the weights or optimizer state are probably "
                        f"non-finite; try a lower --lr or --grad_clip); {saved}")
                opt.zero_grad(set_to_none=True)
                sums["skipped"] += 1
                n_skipped += 1
                log(msg + f"; step skipped ({n_skipped} skipped so far)")
            else:
                n_bad_in_row = 0
                opt.step()
                sched.step()
            f_nfe, res, trace = _info_stats(info, cfg["f_stop_mode"])
            if unrolled:
                f_nfe, b_nfe = float(model.num_unrolled), 0.0
            elif b_info:
                b_nfe, b_res = _backward_stats(b_info[-1])
                sums["b_res"] += b_res
                sums["n_bsolve"] += 1
            else:
                b_nfe = float(cfg["grad"])
            lv = float(loss.detach())
            if ok:
                n = y.numel()
                sums["loss"] += lv * n
                sums["n"] += n
                if isinstance(data, VisionData):
                    sums["correct"] += float((logits.argmax(-1) == y).sum())
                    sums["count"] += n
                sums["f_nfe"] += f_nfe
                sums["b_nfe"] += b_nfe
                if math.isfinite(res):
                    sums["res"] += res
                    sums["n_solve"] += 1
                    last_trace = trace
            step_log.append({"step": step, "epoch": epoch + 1, "loss": lv, "f_nfe": f_nfe,
                             "b_nfe": b_nfe, "residual": res})
            if bar is not None:
                bar.set_postfix(_progress_postfix(sums, lm=isinstance(data, LMData)),
                                refresh=False)
                bar.update(1)
            at_end = cfg["max_steps"] and step >= cfg["max_steps"]
            if at_end or (cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0):
                if dd.main:
                    _append_jsonl(os.path.join(out_dir, "steps.jsonl"), step_log)
                step_log = []
                if b + 1 < len(batches):
                    checkpoint(epoch, b + 1, sums, last_trace, time.time() - t_epoch)
                if at_end:
                    stopped = step
                    break
        if bar is not None:
            bar.close()
        if dd.main and step_log:
            _append_jsonl(os.path.join(out_dir, "steps.jsonl"), step_log)
        if stopped is not None and b + 1 < len(batches):
            break
        # ---- end of epoch: reduce statistics over ranks, evaluate, record, checkpoint
        keys = list(sums)
        sums = dict(zip(keys, dd.sum([sums[k] for k in keys], device)))
        n_steps = sums["steps"]       # all ranks, including those before a mid-epoch resume
        ev = _evaluate(ddp_model, data, cfg, device, dd, unrolled=step <= cfg["pretrain_steps"])
        rec: dict[str, Any] = {
            "epoch": epoch + 1, "step": step,
            "train_loss": sums["loss"] / max(sums["n"], 1),
            "f_nfe": sums["f_nfe"] / max(n_steps - sums["skipped"], 1),
            "b_nfe": sums["b_nfe"] / max(n_steps - sums["skipped"], 1),
            "residual": sums["res"] / sums["n_solve"] if sums["n_solve"] else float("nan"),
            "b_residual": sums["b_res"] / sums["n_bsolve"] if sums["n_bsolve"] else float("nan"),
            "lr": sched.get_last_lr()[0], "skipped": int(sums["skipped"]),
            "pretraining": step <= cfg["pretrain_steps"],
        }
        if isinstance(data, VisionData):
            rec["train_acc"] = sums["correct"] / max(sums["count"], 1)
        else:
            rec["unigram_loss"] = unigram
        rec.update(ev)
        rec["residual_trace"] = last_trace
        rec["seconds"] = time.time() - t_epoch
        rec["elapsed"] = time.time() - t_start
        records.append(rec)
        epoch += 1
        batch_in_epoch = 0
        checkpoint(epoch, 0)
        if dd.main:
            _write_jsonl(os.path.join(out_dir, "metrics.jsonl"), records)
            _plot(out_dir, records)
            if isinstance(data, VisionData):
                test = f"test acc {100 * rec['test_acc']:.2f}%"
            else:
                test = (f"val loss {rec['test_loss']:.3f} (ppl {rec['test_ppl']:.2f}, "
                        f"unigram {unigram:.3f})")
            log(f"epoch {epoch}/{cfg['epochs']}  loss {rec['train_loss']:.4f}  {test}  "
                f"f_nfe {rec['f_nfe']:.1f}  b_nfe {rec['b_nfe']:.1f}  residual "
                f"{rec['residual']:.2e}  b_residual {rec['b_residual']:.2e}  {rec['seconds']:.1f}s"
                + ("  (warm-up: unrolled)" if rec["pretraining"] else ""))
    result = dict(records[-1]) if records else {}
    if stopped is not None:
        result["stopped_at_step"] = stopped
        log(f"stopped after step {stopped} (--max_steps); continue with --resume {out_dir}")
    return result


def _progress_postfix(sums: dict[str, float], lm: bool) -> dict[str, str]:
    """The progress bar's running means of the epoch: loss, perplexity (language models), forward
    NFE, residual and accuracy (classifiers)."""
    mean = sums["loss"] / max(sums["n"], 1)
    post = {"loss": f"{mean:.3f}" if sums["n"] else "-"}
    if lm:
        post["ppl"] = f"{math.exp(min(mean, 50.0)):.2f}" if sums["n"] else "-"
    post["nfe"] = f"{sums['f_nfe'] / max(sums['steps'] - sums['skipped'], 1):.1f}"
    post["res"] = f"{sums['res'] / sums['n_solve']:.1e}" if sums["n_solve"] else "-"
    if sums["count"]:
        post["acc"] = f"{100 * sums['correct'] / sums['count']:.1f}"
    return post


def _append_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    with open(path, "a") as fh:
        for r in records:
            fh.write(json.dumps({k: _finite_or_none(v) for k, v in r.items()}) + "\n")


# ------------------------------------------------------------------------------------ evaluation
EVAL_SPLITS = ("test", "valid")


def evaluate_checkpoint(path: str, overrides: dict[str, Any] | None = None,
                        split: str = "test") -> dict[str, Any]:
    """Evaluate a checkpoint on a held-out split: the test split by default.

    Training reports a language model's validation split each epoch (``test_loss``/``test_ppl``
    in ``metrics.jsonl``); ``split="valid"`` reproduces those numbers. Vision data sets have only
    a test split.

    Args:
        path: checkpoint file or run directory.
        overrides: options to change for evaluation (``data_dir``, ``device``, ``f_solver``,
            ``f_max_iter``, ``f_tol``, ``f_stop_mode``, ``batch_size``, ``bf16``, ``eval_batches``).
        split: ``"test"`` or ``"valid"`` (language models only).

    Returns:
        dict with ``split``, ``test_acc`` (vision) or ``test_loss``/``test_ppl``/``unigram_loss``
        (LM; measured on ``split``), ``test_f_nfe``, ``test_residual``, ``step``, ``epoch``.
    """
    if split not in EVAL_SPLITS:
        raise TrainingError(f"--split {split!r}: expected one of {', '.join(EVAL_SPLITS)}")
    ckpt = load_checkpoint(path)
    cfg = dict(ckpt["config"])
    cfg.update(overrides or {})
    _validate(cfg)
    if split != "test" and DATASETS[cfg["data"]][0] == "vision":
        raise TrainingError(f"--split {split}: {cfg['data']} has no validation split (only "
                            "test)")
    dd = _Dist()
    dd.world, dd.rank, dd.enabled = 1, 0, False
    device = _pick_device(cfg["device"], dd)
    data = _load_data(cfg)
    _check_lm_splits(data, cfg, (split,))
    model = _build(cfg, data, device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint weights do not fit {cfg['model']}: {str(exc)[:300]}") \
            from exc
    out = _evaluate(model, data, cfg, device, dd, unrolled=ckpt["step"] <= cfg["pretrain_steps"],
                    split=split)
    out.pop("test_residual_trace", None)
    if isinstance(data, LMData):
        out["unigram_loss"] = unigram_loss(data, split)
    out.update(split=split, step=ckpt["step"], epoch=ckpt["epoch"], model=cfg["model"],
               data=cfg["data"])
    return out


# ----------------------------------------------------------------------------------- entry points
def _resume_config(ckpt: dict[str, Any], explicit: dict[str, Any], where: str) -> dict[str, Any]:
    cfg = dict(ckpt["config"])
    cfg["max_steps"] = 0          # a stop point belongs to one invocation, not to the run
    diffs = []
    for key, value in explicit.items():
        if key in ("resume", "out"):
            continue
        if key not in RESUMABLE_CHANGES and key in cfg and cfg[key] != value:
            diffs.append(f"--{key}: checkpoint {cfg[key]!r}, command line {value!r}")
        cfg[key] = value
    if diffs:
        raise TrainingError(f"checkpoint {where} comes from an incompatible configuration: "
                            + "; ".join(diffs) + ". Drop these options to resume, or start a new "
                            "run with --out.")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``deq-fast train`` / ``python -m deq_fast.train``; returns the exit code."""
    parser = build_parser()
    explicit = vars(parser.parse_args(argv))
    resume = out_dir = None
    try:
        if "resume" in explicit:
            resume = load_checkpoint(explicit["resume"])
            cfg = _resume_config(resume, explicit, explicit["resume"])
            default_out = (explicit["resume"] if os.path.isdir(explicit["resume"])
                           else os.path.dirname(os.path.abspath(explicit["resume"])))
        else:
            cfg = resolve_config(explicit)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            default_out = os.path.join("runs", f"{cfg['model']}-{stamp}")
        out_dir = explicit.get("out", default_out)
        if resume is not None and os.path.realpath(out_dir) != os.path.realpath(default_out):
            _check_out_dir(out_dir)   # continuing a run elsewhere must not overwrite another one
        cfg.pop("out", None)
        run_training(cfg, out_dir, resume=resume)
    except TrainingError as exc:
        print(f"deq-fast train: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, NonFiniteLoss) else 2
    except KeyboardInterrupt:
        if out_dir is not None and os.path.isfile(os.path.join(out_dir, CKPT_NAME)):
            note = f"the last checkpoint is intact: continue with --resume {out_dir}"
        elif resume is not None:
            note = (f"no checkpoint was written to {out_dir or 'the output directory'}; the one "
                    f"resumed is unchanged: continue with --resume {explicit['resume']}")
        else:
            note = ("no checkpoint was written yet"
                    + (f" to {out_dir}" if out_dir is not None else "") + "; nothing to resume")
        print(f"\ninterrupted; {note}", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``deq-fast eval --ckpt PATH [options]``: print the evaluation as one JSON line."""
    p = argparse.ArgumentParser(prog="deq-fast eval", allow_abbrev=False,
                                argument_default=argparse.SUPPRESS,
                                description="Evaluate a training checkpoint on its test split "
                                "(named in the output as \"split\").")
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory")
    p.add_argument("--split", choices=EVAL_SPLITS, default="test",
                   help="held-out split: test (default) or valid (language models: the split "
                   "training reports each epoch)")
    p.add_argument("--data_dir")
    p.add_argument("--device")
    p.add_argument("--batch_size", type=_positive(int))
    p.add_argument("--bf16", type=_bool, nargs="?", const=True)
    p.add_argument("--eval_batches", type=_nonneg(int))
    p.add_argument("--f_solver", choices=SOLVERS)
    p.add_argument("--f_max_iter", type=_positive(int))
    p.add_argument("--f_tol", type=_positive(float))
    p.add_argument("--f_stop_mode", choices=("abs", "rel"))
    args = vars(p.parse_args(argv))
    path, split = args.pop("ckpt"), args.pop("split")
    try:
        out = evaluate_checkpoint(path, args, split=split)
    except TrainingError as exc:
        print(f"deq-fast eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: _finite_or_none(v) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
