"""What a run records: the statistics of an epoch (:class:`EpochStats`), the solver statistics of
one step, and the files ``metrics.jsonl`` (one record per epoch) and ``steps.jsonl`` (one record
per step), written atomically (a temporary file and a rename).

Non-finite numbers are written as JSON ``null``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["EpochStats", "solve_stats", "backward_stats", "atomic_write_bytes", "write_jsonl",
           "append_jsonl", "read_jsonl", "finite_or_none"]

NAN = float("nan")


@dataclass
class EpochStats:
    """Running sums of one epoch on one rank (:meth:`reduced` sums them over ranks).

    Steps whose loss or gradient was non-finite count in ``steps`` and ``skipped`` only (and in
    the backward residual if a backward solve ran).
    """

    loss: float = 0.0           # sum of per-token/per-sample losses of the kept steps
    correct: float = 0.0        # correctly classified training samples (vision)
    count: float = 0.0          # classified training samples (vision)
    n: float = 0.0              # samples or tokens of the kept steps
    f_nfe: float = 0.0          # forward evaluations, summed over kept steps
    b_nfe: float = 0.0          # backward evaluations, summed over kept steps
    res: float = 0.0            # forward residuals, summed over solves that reported one
    n_solve: float = 0.0
    skipped: float = 0.0        # steps skipped for a non-finite loss or gradient
    b_res: float = 0.0          # backward residuals, summed over backward solves
    n_bsolve: float = 0.0
    steps: float = 0.0          # all steps, kept or skipped
    #: mean forward residual per solver iteration of the last solve that reported one
    residual_trace: list[float] = field(default_factory=list)

    def sums(self) -> dict[str, float]:
        """The numeric sums by name (as stored in a mid-epoch checkpoint)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "residual_trace"}

    @classmethod
    def from_sums(cls, sums: dict[str, float], trace: list[float]) -> EpochStats:
        """The statistics stored in a mid-epoch checkpoint."""
        return cls(**{k: float(v) for k, v in sums.items()}, residual_trace=list(trace))

    def reduced(self, ranks, device: torch.device) -> EpochStats:
        """The sums over all ranks (``ranks``: a :class:`~deq_fast.train.distributed.Ranks`);
        the trace stays this rank's."""
        names = list(self.sums())
        totals = ranks.sum([getattr(self, k) for k in names], device)
        return dataclasses.replace(self, **dict(zip(names, totals)))

    def add_step(self, loss: float, n: int, correct: float | None, f_nfe: float, b_nfe: float,
                 residual: float, trace: list[float]) -> None:
        """Count a step whose loss and gradient were finite.

        Args:
            loss: the step's mean loss; ``n``: its samples or tokens.
            correct: correctly classified samples (vision), or None (language models).
            f_nfe, b_nfe: forward and backward evaluations of the step.
            residual, trace: the forward solve's lowest residual (NaN: none) and trace.
        """
        self.loss += loss * n
        self.n += n
        if correct is not None:
            self.correct += correct
            self.count += n
        self.f_nfe += f_nfe
        self.b_nfe += b_nfe
        if math.isfinite(residual):
            self.res += residual
            self.n_solve += 1
            self.residual_trace = trace

    def add_backward_residual(self, residual: float) -> None:
        """Count one backward solve's residual."""
        self.b_res += residual
        self.n_bsolve += 1

    def record(self) -> dict[str, Any]:
        """The epoch's training means: ``train_loss, f_nfe, b_nfe, residual, b_residual`` (the
        accuracy of classifiers is :attr:`train_acc`)."""
        kept = max(self.steps - self.skipped, 1)
        return {"train_loss": self.loss / max(self.n, 1), "f_nfe": self.f_nfe / kept,
                "b_nfe": self.b_nfe / kept,
                "residual": self.res / self.n_solve if self.n_solve else NAN,
                "b_residual": self.b_res / self.n_bsolve if self.n_bsolve else NAN}

    @property
    def train_acc(self) -> float:
        """Training accuracy of the kept steps (classifiers)."""
        return self.correct / max(self.count, 1)

    def progress_postfix(self, lm: bool) -> dict[str, str]:
        """The progress bar's running means of the epoch: loss, perplexity (language models),
        forward NFE, residual and accuracy (classifiers)."""
        mean = self.loss / max(self.n, 1)
        post = {"loss": f"{mean:.3f}" if self.n else "-"}
        if lm:
            post["ppl"] = f"{math.exp(min(mean, 50.0)):.2f}" if self.n else "-"
        post["nfe"] = f"{self.f_nfe / max(self.steps - self.skipped, 1):.1f}"
        post["res"] = f"{self.res / self.n_solve:.1e}" if self.n_solve else "-"
        if self.count:
            post["acc"] = f"{100 * self.correct / self.count:.1f}"
        return post


def solve_stats(info: dict, stop_mode: str) -> tuple[float, float, list[float]]:
    """Mean forward NFE, mean lowest residual and the batch-mean residual trace of a solve.

    Args:
        info: the DEQ layer's forward information (empty for an unrolled step).
        stop_mode: ``abs`` or ``rel``: which residual to report.

    Returns:
        ``(nfe, residual, trace)``; NaN and ``[]`` when the step ran no solve.
    """
    if not info or "nstep" not in info:
        return NAN, NAN, []
    nfe = float(torch.as_tensor(info["nstep"]).float().mean())
    key = "rel" if stop_mode == "rel" else "abs"
    res = float(torch.as_tensor(info[f"{key}_lowest"]).float().mean())
    trace = info.get(f"{key}_trace")
    trace_list: list[float] = []
    if trace is not None and torch.is_tensor(trace) and trace.numel():
        t = trace.float()
        trace_list = (t.mean(0) if t.dim() == 2 else t).tolist()
    return nfe, res, trace_list


def backward_stats(binfo: dict) -> tuple[float, float]:
    """Backward evaluations (VJPs) and mean relative residual of one backward solve.

    deq_fast reports ``nvjp``/``rel_residual``; TorchDEQ's solvers ``nstep``/``rel_lowest``.

    Args:
        binfo: the information the backward solve wrote.

    Returns:
        ``(nfe, residual)``, NaN where the solver reported nothing.
    """
    nfe = binfo.get("nvjp", binfo.get("nstep"))
    res = binfo.get("rel_residual", binfo.get("rel_lowest"))
    nfe = float(torch.as_tensor(nfe).float().mean()) if nfe is not None else NAN
    res = float(torch.as_tensor(res).float().mean()) if res is not None else NAN
    return nfe, res


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``path`` through a temporary file and a rename; the temporary file is removed if
    anything (an error, Ctrl-C) interrupts the write, and ``path`` keeps its old content.

    Args:
        path: the file to (over)write.
        payload: its new content.
    """
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


def finite_or_none(x: Any) -> Any:
    """``x``, or None for a non-finite float (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps({k: finite_or_none(v) for k, v in record.items()}) + "\n"


def write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` (atomically) with one JSON line per record."""
    atomic_write_bytes(path, "".join(_json_line(r) for r in records).encode())


def append_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    """Append one JSON line per record to ``path``."""
    with open(path, "a") as fh:
        for r in records:
            fh.write(_json_line(r))


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of ``path`` (``[]`` if it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
