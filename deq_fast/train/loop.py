"""The training loop: :func:`run_training` and the :class:`Trainer` behind it (one run: set-up,
resume, epochs, steps, non-finite handling, checkpoints and the per-epoch record).

A run writes to its directory (rank 0 only):

* ``metrics.jsonl``  one record per epoch: ``epoch, step, train_loss, train_acc, test_acc`` (or
  ``test_loss, test_ppl, unigram_loss`` for language models), ``f_nfe, b_nfe, residual, lr,
  seconds, elapsed, skipped, residual_trace`` (mean forward residual per solver iteration, last
  training batch of the epoch);
* ``steps.jsonl``    one record per step: ``step, epoch, loss, f_nfe, b_nfe, residual``;
* ``checkpoint.pt``  see :mod:`deq_fast.train.checkpoint`; saved at the end of every epoch, every
  ``--ckpt_every`` steps and at ``--max_steps``;
* ``config.json``, ``curves.png``, ``residuals.png`` (:mod:`deq_fast.train.plots`).

A resumed run continues exactly where the checkpoint stopped (same data order, dropout masks and
optimizer state: the next step's loss equals the uninterrupted run's; an epoch resumed in its
middle is recorded as a whole).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F

from deq_fast.data import LMData, VisionData, unigram_loss
from deq_fast.ops.extension import extension_status
from deq_fast.train.batches import epoch_batches, get_batch, steps_per_epoch
from deq_fast.train.build import (
    build_run_model,
    check_lm_splits,
    load_run_data,
    make_optimizer,
    require_train_extras,
)
from deq_fast.train.checkpoint import (
    CKPT_FORMAT,
    CKPT_NAME,
    CONFIG_NAME,
    check_out_dir,
    param_digest,
    rng_state,
    save_checkpoint,
    seed_all,
    set_rng_state,
)
from deq_fast.train.config import MAX_CONSECUTIVE_NONFINITE, NonFiniteLoss, TrainConfig, TrainingError
from deq_fast.train.distributed import Ranks, pick_device, wrap_ddp
from deq_fast.train.evaluation import evaluate
from deq_fast.train.plots import plot_run
from deq_fast.train.records import (
    EpochStats,
    append_jsonl,
    atomic_write_bytes,
    backward_stats,
    read_jsonl,
    solve_stats,
    write_jsonl,
)
from deq_fast.train.summary import run_summary

__all__ = ["run_training", "Trainer", "compute_loss"]

Log = Callable[..., None]


def _print(*args: Any) -> None:
    print(*args, flush=True)


def compute_loss(logits: torch.Tensor, target: torch.Tensor,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for classification ``(B, K)`` or language modelling ``(B, L, V)``.

    Args:
        logits: ``(B, K)`` or ``(B, L, V)``, any float dtype (computed in float32).
        target: class indices ``(B,)`` or ``(B, L)``.
        label_smoothing: of the cross-entropy, in [0, 1).

    Returns:
        the mean loss, a scalar.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           label_smoothing=label_smoothing)


def _residual_text(value: float) -> str:
    """An epoch's mean residual for the log line; ``-`` when no solve reported one (warm-up)."""
    return f"{value:.2e}" if math.isfinite(value) else "-"


def run_training(cfg: TrainConfig, out_dir: str, resume: dict[str, Any] | None = None,
                 log: Log = _print) -> dict[str, Any]:
    """Train according to a resolved configuration (see
    :func:`~deq_fast.train.config.resolve_config`).

    Args:
        cfg: the run's configuration (options of ``deq-fast train``).
        out_dir: where metrics, checkpoint and plots go (created).
        resume: a loaded checkpoint to continue from, or None.
        log: function for progress lines (rank 0 only).

    Returns:
        the last epoch's metrics record (``{}`` if no epoch finished), plus ``stopped_at_step``
        when ``max_steps`` ended the run early.

    Raises:
        TrainingError: bad configuration or data (before training), a missing package of the
            ``train`` extra, or ``--nonfinite stop``.
    """
    with warnings.catch_warnings():
        # An unconverged backward solve is expected early in training; it is reported per epoch
        # as ``b_residual`` in metrics.jsonl instead of one warning per step.
        warnings.filterwarnings("ignore", message="DEQ backward solve")
        return Trainer(cfg, out_dir, resume, log).run()


class Trainer:
    """One training run: its pieces, its position in the data order and its records.

    Every rank builds one; collective calls (statistics, checkpoints, evaluation) happen in the
    same order on all ranks.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str, resume: dict[str, Any] | None,
                 log: Log) -> None:
        """Check the run, load the data, build model and optimizer, restore ``resume`` (a
        loaded checkpoint) and prepare ``out_dir``; ``log`` prints on rank 0 only.

        Raises:
            TrainingError: before any training, naming the option or file at fault.
        """
        self.cfg, self.out_dir = cfg, out_dir
        self.ckpt_path = os.path.join(out_dir, CKPT_NAME)
        self.ranks = Ranks()
        self._check_and_load(resume is None)
        self.log = log if self.ranks.main else (lambda *a, **k: None)
        seed_all(cfg.seed)
        self.model = build_run_model(cfg, self.data, self.device)
        self.unigram = None if isinstance(self.data, VisionData) else unigram_loss(self.data)
        self.opt, self.sched = make_optimizer(self.model, cfg,
                                              steps_per_epoch(self.data, cfg, self.ranks))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.records: list[dict[str, Any]] = []
        self.partial: dict[str, Any] | None = None   # statistics of the resumed epoch's first part
        if resume is not None:
            self._restore(resume)
        elif self.ranks.enabled:
            # different dropout masks per rank
            torch.manual_seed(cfg.seed + 7919 * self.ranks.rank)
        self.ddp_model = wrap_ddp(self.model, self.device, self.ranks)
        if self.ranks.main:
            self._prepare_out_dir(resumed=resume is not None)
        self.amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(cfg.bf16))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.t_start = time.time() - (resume["elapsed"] if resume is not None else 0.0)
        self.n_skipped = sum(r["skipped"] for r in self.records)
        if self.partial is not None:
            self.n_skipped += int(self.partial["sums"]["skipped"])
        self.n_bad_in_row = 0          # consecutive non-finite steps
        self.stopped: int | None = None

    # ------------------------------------------------------------------------------- set-up
    def _check_and_load(self, fresh: bool) -> None:
        """Everything that can refuse the run before work: options, processes, device, output
        directory (of a ``fresh`` run), data; then join the process group."""
        cfg, ranks = self.cfg, self.ranks
        require_train_extras()
        cfg.validate()
        if cfg.batch_size % ranks.world:
            raise TrainingError(f"--batch_size {cfg.batch_size} is the global batch and must be "
                                f"divisible by the number of processes ({ranks.world})")
        self.device = pick_device(cfg.device, ranks)
        if fresh:
            check_out_dir(self.out_dir)
        self.threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // max(ranks.local_world, 1))
        torch.set_num_threads(self.threads)
        self.data = load_run_data(cfg)
        check_lm_splits(self.data, cfg, ("train", "valid", "test"))
        ranks.init(self.device)

    def _restore(self, resume: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, position, records and this rank's RNG state."""
        try:
            self.model.load_state_dict(resume["model"])
        except RuntimeError as exc:
            raise TrainingError(f"checkpoint weights do not fit {self.cfg.model}: "
                                f"{str(exc)[:300]}") from exc
        self.opt.load_state_dict(resume["optimizer"])
        self.sched.load_state_dict(resume["scheduler"])
        self.step, self.epoch = resume["step"], resume["epoch"]
        self.batch_in_epoch = resume["batch_in_epoch"]
        self.records = [r for r in resume["metrics"] if r["epoch"] < self.epoch + 1]
        self.partial = resume["epoch_partial"] if self.batch_in_epoch else None
        rngs = resume["rng"]
        if len(rngs) != self.ranks.world:
            self.log(f"note: checkpoint written by {len(rngs)} process(es), resuming with "
                     f"{self.ranks.world}: data order and dropout masks will differ from an "
                     "uninterrupted run")
        set_rng_state(rngs[self.ranks.rank % len(rngs)])

    def _prepare_out_dir(self, resumed: bool) -> None:
        """Create the run directory, write ``config.json`` and the records so far (a resumed
        run's ``steps.jsonl`` is cut back to the checkpoint's step)."""
        out_dir = self.out_dir
        try:
            os.makedirs(out_dir, exist_ok=True)
            atomic_write_bytes(os.path.join(out_dir, CONFIG_NAME),
                               json.dumps(self.cfg.to_dict(), indent=1, default=str).encode())
        except OSError as exc:
            raise TrainingError(f"--out {out_dir!r}: cannot create the output directory or write "
                                f"to it ({exc.strerror or exc}); expected a writable directory "
                                "path") from exc
        write_jsonl(os.path.join(out_dir, "metrics.jsonl"), self.records)
        steps_path = os.path.join(out_dir, "steps.jsonl")
        write_jsonl(steps_path, [r for r in read_jsonl(steps_path) if r["step"] <= self.step]
                    if resumed else [])

    # --------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train until ``--epochs`` (or ``--max_steps``); see :func:`run_training`."""
        cfg = self.cfg
        self.log(f"training {cfg.model} on {cfg.data} "
                 f"({sum(p.numel() for p in self.params):,} parameters, {self.ranks.world} "
                 f"process(es), {self.threads} thread(s) each, device {self.device}, "
                 f"deq_impl {cfg.deq_impl}) -> {self.out_dir}")
        ext_ok, ext_msg = extension_status()
        if not ext_ok:
            self.log(f"note: {ext_msg}")
        while self.epoch < cfg.epochs and self.stopped is None:
            self._run_epoch()
        result = dict(self.records[-1]) if self.records else {}
        if self.stopped is not None:
            result["stopped_at_step"] = self.stopped
            self.log(f"stopped after step {self.stopped} (--max_steps); continue with --resume "
                     f"{self.out_dir}")
        self.log(run_summary(self.records, self.out_dir, time.time() - self.t_start, cfg.epochs))
        return result

    def _start_epoch(self) -> tuple[EpochStats, float]:
        """Fresh statistics and start time of the epoch; resumed mid-epoch, the epoch's totals
        so far (over all ranks) start on rank 0 and its time so far counts."""
        stats, t_epoch = EpochStats(), time.time()
        if self.partial is not None:
            if self.ranks.main:
                stats = EpochStats.from_sums(self.partial["sums"], self.partial["residual_trace"])
            t_epoch -= self.partial["seconds"]
            self.partial = None
        return stats, t_epoch

    def _progress_bar(self, total: int):
        """A tqdm bar over the epoch's batches (rank 0, ``--progress``), or None."""
        progress = self.cfg.progress
        if not (progress and self.ranks.main):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}",
                    leave=False, dynamic_ncols=True, file=sys.stderr,
                    disable=None if progress == "auto" else not progress)

    def _run_epoch(self) -> None:
        """The rest of the current epoch; recorded unless ``--max_steps`` stopped it inside."""
        cfg, steps_path = self.cfg, os.path.join(self.out_dir, "steps.jsonl")
        batches = epoch_batches(self.data, cfg, self.epoch, self.ranks)
        stats, t_epoch = self._start_epoch()
        bar = self._progress_bar(len(batches))
        step_log: list[dict[str, Any]] = []
        for b in range(self.batch_in_epoch, len(batches)):
            step_log.append(self._train_step(batches[b], b, stats))
            if bar is not None:
                bar.set_postfix(stats.progress_postfix(lm=isinstance(self.data, LMData)),
                                refresh=False)
                bar.update(1)
            at_end = cfg.max_steps and self.step >= cfg.max_steps
            if at_end or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                if self.ranks.main:
                    append_jsonl(steps_path, step_log)
                step_log = []
                if b + 1 < len(batches):
                    self._save(self.epoch, b + 1, stats, time.time() - t_epoch)
                if at_end:
                    self.stopped = self.step
                    break
        if bar is not None:
            bar.close()
        if self.ranks.main and step_log:
            append_jsonl(steps_path, step_log)
        if self.stopped is not None and b + 1 < len(batches):
            return
        self._finish_epoch(stats, t_epoch)

    def _train_step(self, idx: torch.Tensor, b: int, stats: EpochStats) -> dict[str, Any]:
        """One optimisation step on batch ``b`` (indices ``idx``); returns its steps.jsonl
        record."""
        cfg = self.cfg
        x, y = get_batch(self.data, cfg, idx, self.device, train=True)
        self.step += 1
        stats.steps += 1
        unrolled = self.step <= cfg.pretrain_steps
        b_info: list[dict] = []
        with self.amp:
            logits, info = self.ddp_model(x, unrolled=unrolled,
                                          jac_loss=cfg.jac_loss_weight > 0 and not unrolled,
                                          backward_writer=b_info.append)
        loss = compute_loss(logits, y, cfg.label_smoothing)
        total = loss + cfg.jac_loss_weight * info["jac_loss"] if "jac_loss" in info else loss
        ok = self._backward_and_update(total, b)
        if not ok:
            stats.skipped += 1
        f_nfe, res, trace = solve_stats(info, cfg.f_stop_mode)
        if unrolled:
            f_nfe, b_nfe = float(self.model.num_unrolled), 0.0
        elif b_info:
            b_nfe, b_res = backward_stats(b_info[-1])
            stats.add_backward_residual(b_res)
        else:
            b_nfe = float(cfg.grad)
        lv = float(loss.detach())
        if ok:
            correct = (float((logits.argmax(-1) == y).sum())
                       if isinstance(self.data, VisionData) else None)
            stats.add_step(lv, y.numel(), correct, f_nfe, b_nfe, res, trace)
        return {"step": self.step, "epoch": self.epoch + 1, "loss": lv, "f_nfe": f_nfe,
                "b_nfe": b_nfe, "residual": res}

    def _backward_and_update(self, total: torch.Tensor, b: int) -> bool:
        """Backward pass, gradient clipping and optimizer step, if the loss and the gradient are
        finite on every rank; otherwise :meth:`_skip_nonfinite`. Returns whether it stepped."""
        cfg = self.cfg
        ok = self.ranks.all_true(bool(torch.isfinite(total)), self.device)
        self.opt.zero_grad(set_to_none=True)
        what = "loss"
        if ok:
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(
                self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            ok = bool(torch.isfinite(gnorm))      # DDP gradients are identical on all ranks
            what = "gradient"
        if not ok:
            self._skip_nonfinite(what, total, b)
            return False
        self.n_bad_in_row = 0
        self.opt.step()
        self.sched.step()
        return True

    def _skip_nonfinite(self, what: str, total: torch.Tensor, b: int) -> None:
        """Skip a step with a non-finite ``what`` (loss or gradient), or stop the run.

        Raises:
            NonFiniteLoss: with ``--nonfinite stop``, or after ``MAX_CONSECUTIVE_NONFINITE``
                consecutive non-finite steps; the message says whether a checkpoint exists.
        """
        self.n_bad_in_row += 1
        msg = (f"non-finite {what} (loss {total.detach().item():.4g}) at step {self.step} "
               f"(epoch {self.epoch + 1}, batch {b + 1})")
        saved = (f"the last checkpoint in {self.out_dir} is intact"
                 if os.path.isfile(self.ckpt_path) else
                 f"no checkpoint has been written to {self.out_dir} yet")
        if self.cfg.nonfinite == "stop":
            raise NonFiniteLoss(msg + f"; stopped (--nonfinite stop); {saved}")
        if self.n_bad_in_row >= MAX_CONSECUTIVE_NONFINITE:
            raise NonFiniteLoss(
                msg + f"; stopped after {self.n_bad_in_row} consecutive non-finite steps "
                "(--nonfinite skip gives up: the weights or optimizer state are probably "
                f"non-finite; try a lower --lr or --grad_clip); {saved}")
        self.opt.zero_grad(set_to_none=True)
        self.n_skipped += 1
        self.log(msg + f"; step skipped ({self.n_skipped} skipped so far)")

    # ------------------------------------------------------------------- epoch end and saving
    def _finish_epoch(self, stats: EpochStats, t_epoch: float) -> None:
        """Sum the statistics over ranks, evaluate, record the epoch, checkpoint, write the
        records and plots, and log one line."""
        cfg = self.cfg
        stats = stats.reduced(self.ranks, self.device)
        pretraining = self.step <= cfg.pretrain_steps
        ev = evaluate(self.ddp_model, self.data, cfg, self.device, self.ranks, unrolled=pretraining)
        rec: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, **stats.record(),
                               "lr": self.sched.get_last_lr()[0], "skipped": int(stats.skipped),
                               "pretraining": pretraining}
        if isinstance(self.data, VisionData):
            rec["train_acc"] = stats.train_acc
        else:
            rec["unigram_loss"] = self.unigram
        rec.update(ev)
        rec["residual_trace"] = stats.residual_trace
        rec["seconds"] = time.time() - t_epoch
        rec["elapsed"] = time.time() - self.t_start
        self.records.append(rec)
        self.epoch += 1
        self.batch_in_epoch = 0
        self._save(self.epoch, 0)
        if self.ranks.main:
            write_jsonl(os.path.join(self.out_dir, "metrics.jsonl"), self.records)
            plot_run(self.out_dir, self.records, self.cfg)
            self.log(self._epoch_line(rec))

    def _epoch_line(self, rec: dict[str, Any]) -> str:
        """The log line of an epoch record."""
        if isinstance(self.data, VisionData):
            test = f"test acc {100 * rec['test_acc']:.2f}%"
        else:
            test = (f"val loss {rec['test_loss']:.3f} (ppl {rec['test_ppl']:.2f}, "
                    f"unigram {self.unigram:.3f})")
        return (f"epoch {self.epoch}/{self.cfg.epochs}  loss {rec['train_loss']:.4f}  {test}  "
                f"f_nfe {rec['f_nfe']:.1f}  b_nfe {rec['b_nfe']:.1f}  residual "
                f"{_residual_text(rec['residual'])}  b_residual "
                f"{_residual_text(rec['b_residual'])}  {rec['seconds']:.1f}s"
                + ("  (warm-up: unrolled layers, no solver residuals)" if rec["pretraining"]
                   else ""))

    def _save(self, epoch: int, batch: int, stats: EpochStats | None = None,
              seconds: float = 0.0) -> None:
        """Save the run at (``epoch``, ``batch``); mid-epoch (``batch > 0``) also the epoch's
        statistics so far, summed over ranks, and its ``seconds`` so far, so a resumed run's
        epoch record covers the whole epoch.

        Raises:
            TrainingError: the ranks' parameters differ (DistributedDataParallel lost sync).
        """
        ranks = self.ranks
        rngs = ranks.gather(rng_state())
        prints = ranks.gather(param_digest(self.model))
        if len(set(prints)) > 1:
            raise TrainingError(f"parameters differ across processes at step {self.step} "
                                f"(digests {prints}); DistributedDataParallel lost sync")
        part = None
        if batch and stats is not None:
            part = {"sums": stats.reduced(ranks, self.device).sums(),
                    "residual_trace": list(stats.residual_trace), "seconds": seconds}
        if ranks.main:
            save_checkpoint(self.ckpt_path, {
                "format": CKPT_FORMAT, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": rngs, "step": self.step,
                "epoch": epoch, "batch_in_epoch": batch, "metrics": self.records,
                "world_size": ranks.world, "param_digests": prints, "epoch_partial": part,
                "elapsed": time.time() - self.t_start})
        ranks.barrier()
