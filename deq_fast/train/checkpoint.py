"""The run directory and its checkpoint: the format, atomic saving, checked loading, the random
number generator states a checkpoint carries, and the parameter digest that proves the ranks agree.

``checkpoint.pt`` (format ``deq_fast.train/1``) holds: ``format, config`` (a
:meth:`~deq_fast.train.config.TrainConfig.to_dict`), ``model, optimizer, scheduler`` (state dicts),
``rng`` (one state per rank), ``step, epoch, batch_in_epoch`` (position in the data order),
``metrics`` (the finished epochs' records), ``world_size, param_digests``, ``epoch_partial`` (the
current epoch's statistics so far when saved mid-epoch, else None) and ``elapsed`` (seconds).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import zipfile
from typing import Any

import numpy as np
import torch

from deq_fast.train.config import TrainingError
from deq_fast.train.records import atomic_write_bytes

__all__ = ["CKPT_NAME", "CONFIG_NAME", "CKPT_FORMAT", "save_checkpoint", "load_checkpoint",
           "read_run_config", "check_out_dir",
           "rng_state", "set_rng_state", "seed_all", "param_digest"]

CKPT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
CKPT_FORMAT = "deq_fast.train/1"


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (never half-written).

    Args:
        path: the checkpoint file.
        state: the fields listed in the module docstring.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, arg: str = "--resume") -> dict[str, Any]:
    """Read a training checkpoint (a file, or a run directory holding ``checkpoint.pt``).

    Args:
        path: the checkpoint file or its run directory.
        arg: the command-line option that gave ``path``, named in errors.

    Returns:
        the checkpoint's fields (tensors on the CPU).

    Raises:
        TrainingError: missing, a run's ``config.json``, truncated/corrupt, not a PyTorch file, or
            a PyTorch file that is not a deq_fast training checkpoint; the message names ``arg``
            and what was expected.
    """
    expected = f"expected a run directory of deq-fast train or its {CKPT_NAME}"
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CKPT_NAME)):
            raise TrainingError(f"{arg} {path!r}: no {CKPT_NAME} in this directory; {expected}")
        path = os.path.join(path, CKPT_NAME)
    if not os.path.exists(path):
        raise TrainingError(f"{arg} {path!r} does not exist; {expected}")
    if os.path.basename(path) == CONFIG_NAME:
        raise TrainingError(f"{arg} {path!r} is a run's configuration, not its checkpoint; pass "
                            f"the run directory: {arg} {os.path.dirname(path) or '.'}")
    if not zipfile.is_zipfile(path):
        raise TrainingError(f"{arg} {path!r} is corrupt or truncated, or not a PyTorch file; "
                            f"{expected}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip/pickle data
        # torch's own message advises weights_only=False: never right for a file we did not write
        raise TrainingError(f"{arg} {path!r} is a PyTorch file that is not a checkpoint of "
                            f"deq-fast train (it holds Python objects other than tensors and "
                            f"plain values, or is damaged: {type(exc).__name__}); {expected}") \
            from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise TrainingError(f"{arg} {path!r} is a PyTorch file but not a checkpoint of deq-fast "
                            f"train (no format {CKPT_FORMAT!r}: a bare state_dict, or another "
                            f"program's checkpoint?); {expected}")
    return ckpt


def read_run_config(run_dir: str) -> dict[str, Any] | None:
    """The ``config.json`` of a run directory that has no checkpoint yet (a run interrupted
    before its first checkpoint), or None when ``run_dir`` holds no such run.

    Raises:
        TrainingError: ``config.json`` exists but is not a JSON object.
    """
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isdir(run_dir) or os.path.isfile(os.path.join(run_dir, CKPT_NAME)) \
            or not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            values = json.load(fh)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"--resume {run_dir!r}: its {CONFIG_NAME} cannot be read ({exc})") \
            from exc
    if not isinstance(values, dict):
        raise TrainingError(f"--resume {run_dir!r}: its {CONFIG_NAME} is not a configuration")
    return values


def check_out_dir(out_dir: str) -> None:
    """Refuse to start a run in a directory that already holds one (it would be overwritten).

    A directory left by a run interrupted before its first checkpoint (``config.json``, empty
    ``metrics.jsonl``, maybe some ``steps.jsonl``) holds nothing to lose and is reused.

    Raises:
        TrainingError: ``out_dir`` is a file, or holds a checkpoint or recorded epochs.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainingError(f"--out {out_dir!r} exists and is not a directory; expected a "
                            "directory path (created if missing)")
    found = [f for f in ("metrics.jsonl", CKPT_NAME)
             if os.path.isfile(os.path.join(out_dir, f))
             and os.path.getsize(os.path.join(out_dir, f)) > 0]
    if CKPT_NAME in found:
        raise TrainingError(f"--out {out_dir!r} already holds a run ({', '.join(found)}); pass "
                            f"--resume {out_dir} to continue it, or choose another --out")
    if found:
        raise TrainingError(f"--out {out_dir!r} holds the epoch records of a run whose "
                            f"{CKPT_NAME} is missing, so it cannot be continued; choose another "
                            "--out, or remove the directory")


def rng_state() -> dict[str, Any]:
    """This process's torch, Python, NumPy (and CUDA) generator states, as checkpoint-safe
    values (tensors and plain types: the checkpoint is loaded with ``weights_only``)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       int(np_state[2]), int(np_state[3]), float(np_state[4]))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters' bytes: equal across DDP ranks iff the weights are identical."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
