"""Stage 6: the training loop, with the book's semantics (D2L 8.5 ``train_ch8``) and a fast path.

Semantics kept from the book: per epoch a fresh minibatch offset; with sequential partitioning the hidden
state starts at zero each epoch and is carried (detached) from one minibatch to the next; cross-entropy
averaged over the minibatch; the global gradient norm clipped to ``clip_norm`` exactly as ``grad_clipping``
does (scale by ``theta / norm`` only when ``norm > theta``); per-epoch perplexity = exp(mean training loss)
and tokens/s over the epoch.

What makes it fast without changing those semantics:

* the token ids live on the training device in the dtype they come in (uint8 from a token cache); an
  epoch's minibatches are views of them (random ones: gathered one minibatch at a time), each converted to
  int64 by the copy into the step's static buffers;
* the step never syncs with the host, and on CUDA it is captured once as a CUDA graph and replayed
  (``deeprnn.training.step``);
* the host reads losses and timings back only every few epochs (to log, evaluate or checkpoint), using CUDA
  events for per-epoch times, so the GPU never waits for Python;
* inside a long epoch the host still reads back every ``_SYNC_SECONDS`` (progress), and every
  ``eval_every_steps`` / ``checkpoint_every_steps`` steps (``deeprnn.training.schedule``); ``max_steps`` ends training
  at any minibatch, and a checkpoint taken there carries the position inside the epoch
  (``deeprnn.training.state``), so a resume continues from the next one;
* on the CPU nothing is switched off: oneDNN's LSTM kernels measured 1.5x faster than PyTorch's native ones
  for the book's shapes with 2 threads (``bench/train_speed.py --mode kernels``), so they stay on.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from deeprnn.config import TrainConfig
from deeprnn.data.batching import EpochBatches, check_enough_tokens, num_batches
from deeprnn.evaluate import perplexity_from_loss, perplexity_until
from deeprnn.model import RNNLM, zero_state_
from deeprnn.training.divergence import check_loss, check_weights
from deeprnn.training.progress import EpochStats, FitResult, Reporter, StepStats
from deeprnn.training.schedule import Due, Schedule
from deeprnn.training.selection import Best
from deeprnn.training.state import Position, optimizer_state, restore_position, rng_from_lists, rng_to_lists
from deeprnn.training.step import Clock, TrainStep, make_optimizer, use_bf16

_SYNC_SECONDS = 2.0  # read results back at least this often, so progress stays visible on long epochs


@dataclass
class _Pending:
    """An epoch (or its part trained) whose results are still on the device."""

    epoch: int
    loss_sum: torch.Tensor  # summed training loss of the epoch (or of its part trained), on the device
    start: Any
    end: Any
    tokens: int
    lr: float
    step: int
    batches: int  # minibatches the mean is over
    partial: bool


@dataclass
class _Run:
    """Bookkeeping of one ``fit`` call: callbacks, schedule, what is not yet read back, the last report."""

    on_epoch: Callable[[EpochStats], None] | None
    on_checkpoint: Callable[[int], None] | None
    on_step: Callable[[StepStats], None] | None
    stop_requested: Callable[[], object] | None  # not None when the run must stop (e.g. a signal)
    schedule: Schedule
    reporter: Reporter
    t_start: float
    history: list[EpochStats] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)
    last_sync: float = 0.0
    drained_loss_sum: float = 0.0  # summed loss and minibatches of the last epoch read back
    drained_batches: int = 0


class Trainer:
    """Trains an ``RNNLM`` on token ids; resumable through ``state_dict``/``load_state_dict``.

    ``heldout_ids`` is evaluated every ``cfg.eval_every`` epochs and every ``cfg.eval_every_steps`` steps,
    over its first ``cfg.eval_max_tokens`` tokens. With ``select_best`` (a validation split) the weights of
    the best held-out epoch are restored at the end; otherwise the last epoch's are kept, as in the book.
    Token ids may be of any integer dtype and stay in it (a CPU tensor over a memory map stays one).
    """

    def __init__(
        self,
        model: RNNLM,
        train_ids: torch.Tensor,
        cfg: TrainConfig,
        device: torch.device,
        heldout_ids: torch.Tensor | None = None,
        select_best: bool = False,
    ) -> None:
        check_enough_tokens(train_ids.numel(), cfg.batch_size, cfg.num_steps)
        if train_ids.is_floating_point() or train_ids.is_complex() or train_ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, not {train_ids.dtype}")
        self.cfg = cfg
        self.device = device
        self.model = model.to(device).train()
        # Ids keep the dtype they come in (uint8 from a token cache is 8x smaller than int64): each minibatch
        # becomes int64 when it is copied into the step's buffers, each evaluation chunk when it reaches the model.
        self.train_ids = train_ids.to(device=device)
        self.heldout_ids = heldout_ids
        self.select_best = select_best
        self.rng = random.Random(cfg.seed)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken, across resumes
        self._pos: Position | None = None  # the epoch in progress
        self._resume: dict[str, Any] | None = None  # a position inside an epoch to continue from
        self.best = Best()
        self.spent_seconds = 0.0  # training time before this fit (a resumed run continues its time budget)
        self._schedule: Schedule | None = None  # the running fit's
        self.use_graph = cfg.fast and device.type == "cuda"
        self.autocast = use_bf16(cfg.precision, device)
        self.optimizer = make_optimizer(
            self.model, cfg, device, tensor_lr=self.use_graph and cfg.lr_schedule != "constant"
        )
        self.train_step = TrainStep(self.model, cfg, device, self.optimizer, self.autocast)
        self.clock = Clock(device)

    @property
    def step_mode(self) -> str:
        """How steps run: ``"cuda-graph"`` once captured, else ``"eager"``."""
        return self.train_step.mode

    # ----- the loop -------------------------------------------------------------------------------
    def fit(
        self,
        on_epoch: Callable[[EpochStats], None] | None = None,
        on_checkpoint: Callable[[int], None] | None = None,
        checkpoint_every: int | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        stop_requested: Callable[[], object] | None = None,
    ) -> FitResult:
        """Train from where the trainer stands to ``cfg.epochs`` or ``cfg.max_steps`` optimizer steps.

        Calls ``on_epoch`` for every epoch (in order, a few at a time; the one a step budget ends early comes
        with ``partial=True``), ``on_step`` every time results are read back (at least every
        ``_SYNC_SECONDS``, also inside an epoch), and ``on_checkpoint(epochs_done)`` every ``checkpoint_every``
        epochs, every ``cfg.checkpoint_every_steps`` steps and at the end.
        """
        cfg = self.cfg
        per_epoch = num_batches(self.train_ids.numel(), cfg.batch_size, cfg.num_steps, 0)
        evaluates, checkpoints = self.heldout_ids is not None, on_checkpoint is not None
        schedule = Schedule(
            cfg, evaluates, checkpoints, checkpoint_every, per_epoch, self.spent_seconds, self.step,
            tokens_per_step=cfg.batch_size * cfg.num_steps, eval_tokens=self._eval_tokens() or 0,
        )  # fmt: skip
        if self.use_graph and self.train_step.graph is None and not schedule.finished(self.epoch, self.step):
            self.train_step.capture()
        schedule.begin()  # the time budget counts from here, after the one-off capture
        self._schedule, now = schedule, time.perf_counter()
        planned = schedule.planned if cfg.time_budget is not None else cfg.max_steps
        reporter = Reporter(cfg.epochs, planned, cfg.batch_size * cfg.num_steps, self.step)
        run = _Run(on_epoch, on_checkpoint, on_step, stop_requested, schedule, reporter, now, last_sync=now)
        try:
            while not schedule.finished(self.epoch, self.step):
                self._run_epoch(self.epoch + 1, run)
            self.clock.sync()
        finally:
            self.spent_seconds, self._schedule = schedule.elapsed(), None
        train_seconds = time.perf_counter() - run.t_start
        if self.select_best and self.best.state is not None:
            self.model.load_state_dict(self.best.state)
        return self._result(run.history, train_seconds, schedule)

    def _result(self, history: list[EpochStats], train_seconds: float, schedule: Schedule) -> FitResult:
        total_tokens = sum(h.tokens_per_sec * h.seconds for h in history)
        device_seconds = sum(h.seconds for h in history)
        return FitResult(
            history=history,
            epochs_done=self.epoch,
            final_train_perplexity=history[-1].train_perplexity if history else math.nan,
            best_epoch=self.best.epoch,
            best_heldout_perplexity=self.best.value,
            train_seconds=train_seconds,
            tokens_per_sec=total_tokens / device_seconds if device_seconds > 0 else 0.0,
            step_mode=self.step_mode,
            precision="bf16" if self.autocast else "fp32",
            steps_done=self.step,
            eval_tokens=self._eval_tokens(),
            stop_reason=schedule.stop_reason or "",
            stop_detail=schedule.stop_detail,
            best_step=self.best.step,
            evaluations=self.best.evaluations,
        )

    def _begin_epoch(self, epoch: int) -> tuple[EpochBatches, Position]:
        """Draw the epoch's minibatches and reset (or, resuming inside it, restore) the carried state."""
        cfg = self.cfg
        resume, self._resume = self._resume, None
        if resume is not None and int(resume["epoch"]) == epoch:
            self.rng.setstate(rng_from_lists(resume["rng_before"]))  # draw the same minibatches again
        else:
            resume = None
        rng_before = rng_to_lists(self.rng.getstate())
        batches = EpochBatches(self.train_ids, cfg.batch_size, cfg.num_steps, cfg.partition, self.rng)
        zero_state_(self.train_step.state)  # the book starts every epoch from a zero state
        self.train_step.loss_sum.zero_()
        first = restore_position(resume, self.train_step) if resume is not None else 0
        self._pos = Position(epoch, first, len(batches), rng_before)
        return batches, self._pos

    def _run_epoch(self, epoch: int, run: _Run) -> None:
        """Train one epoch (or its rest, or until the step budget is spent), reporting as it goes."""
        cfg, step = self.cfg, self.train_step
        schedule = run.schedule
        lr = schedule.lr(epoch)
        step.set_lr(lr)
        batches, pos = self._begin_epoch(epoch)
        first = pos.batch
        run.reporter.begin_epoch(float(step.loss_sum) if first else 0.0, first)
        start = self.clock.mark()
        for i in range(first, pos.batches):
            if schedule.budget_spent(self.step):
                break
            if schedule.per_step:
                lr = schedule.step_lr(self.step)
                step.set_lr(lr)
            batches.load(i, step.x, step.y)
            step()
            self.step += 1
            pos.batch = i + 1
            if pos.batch < pos.batches and not schedule.budget_spent(self.step):  # else the epoch's end reports
                due = schedule.due_by_steps(self.step)
                stop = run.stop_requested is not None and run.stop_requested() is not None
                if due.evaluate or due.checkpoint or stop or time.perf_counter() - run.last_sync > _SYNC_SECONDS:
                    self._report_inside(run, due)
        end = self.clock.mark()
        done = pos.batch
        tokens = (done - first) * cfg.batch_size * cfg.num_steps
        partial = done < pos.batches
        run.pending.append(_Pending(epoch, step.loss_sum.clone(), start, end, tokens, lr, self.step, done, partial))
        if not partial:
            self.epoch, self._pos = epoch, None
        self._end_epoch(epoch, partial, run)

    def _end_epoch(self, epoch: int, partial: bool, run: _Run) -> None:
        """After an epoch (or the part the budget allowed): read back, evaluate, checkpoint when due."""
        last = run.schedule.finished(self.epoch, self.step)
        due = run.schedule.due_at_epoch_end(epoch, self.step, complete=not partial, last=last)
        now = time.perf_counter()
        if last or due.evaluate or due.checkpoint or run.schedule.logs_at(epoch) or now - run.last_sync > _SYNC_SECONDS:
            stats = self._drain(run, due.evaluate)
            self._step_report(run, stats[-1].heldout_perplexity, epoch_end=True, loss_sum=run.drained_loss_sum)
            if due.checkpoint:
                self._checkpoint(run)

    def _report_inside(self, run: _Run, due: Due) -> None:
        """A report inside an epoch: earlier epochs' results, a progress report, an evaluation or checkpoint."""
        if run.pending:
            self._drain(run, evaluate=False)
        loss_sum = float(self.train_step.loss_sum)  # syncs with the device
        held, whole = self._heldout_perplexity(run.schedule) if due.evaluate else (None, False)
        if held is not None and (whole or self.best.value is None):  # as in _record_heldout
            self._consider(held, self._pos.epoch if self._pos else self.epoch, run.schedule)
        self._step_report(run, held, epoch_end=False, loss_sum=loss_sum)
        if due.checkpoint:
            self._checkpoint(run)

    def _checkpoint(self, run: _Run) -> None:
        check_weights(self.train_step.params, self._pos.epoch if self._pos else self.epoch)  # never save NaN weights
        if run.on_checkpoint is not None:
            run.on_checkpoint(self.epoch)
        run.schedule.checkpointed()
        run.last_sync = time.perf_counter()

    def _step_report(self, run: _Run, heldout: float | None, epoch_end: bool, loss_sum: float) -> None:
        """Hand the ``StepStats`` of the steps since the previous report to ``on_step``."""
        if self._pos is not None:  # inside an epoch, or at the end of one the budget cut short
            epoch, batch, batches = self._pos.epoch, self._pos.batch, self._pos.batches
        else:
            epoch, batch, batches = self.epoch, run.drained_batches, run.drained_batches
        run.schedule.replan(self.step)  # a time budget's plan, from the throughput so far
        if run.reporter.max_steps is not None and self.cfg.time_budget is not None:
            run.reporter.max_steps = run.schedule.planned
        # A budget's end inside an epoch is reported as inside it: the line says where.
        stats, mean = run.reporter.report(
            self.step, epoch, batch, batches, loss_sum, heldout, epoch_end and self._pos is None
        )
        check_loss(epoch, mean)
        if run.on_step is not None:
            run.on_step(stats)
        run.reporter.restart_window()
        run.last_sync = time.perf_counter()

    # ----- read-back and held-out evaluation ------------------------------------------------------
    def _drain(self, run: _Run, evaluate: bool) -> list[EpochStats]:
        """Read the pending epochs' losses and times back (one sync), check them, evaluate if due, report."""
        pending, run.pending = run.pending, []
        values = torch.stack([t for p in pending for t in (p.loss_sum / p.batches, p.loss_sum)]).tolist()  # one sync
        self.clock.sync()
        stats = []
        for k, p in enumerate(pending):
            loss = values[2 * k]
            check_loss(p.epoch, loss)
            seconds = max(self.clock.seconds(p.start, p.end), 1e-9)
            ppl = perplexity_from_loss(loss)
            stats.append(EpochStats(p.epoch, ppl, p.tokens / seconds, seconds, p.lr, None, p.step, p.partial))
        run.drained_loss_sum, run.drained_batches = values[-1], pending[-1].batches
        if evaluate and self.heldout_ids is not None:
            self._record_heldout(stats[-1], run.schedule)
        run.history.extend(stats)
        if run.on_epoch is not None:
            for s in stats:
                run.on_epoch(s)
        return stats

    def _record_heldout(self, stats: EpochStats, schedule: Schedule) -> None:
        """Measure held-out perplexity into ``stats`` and weigh it (``_consider``)."""
        value, whole = self._heldout_perplexity(schedule)
        stats.heldout_perplexity = value
        # An epoch a step budget cut short competes only when the run is planned in steps or time: then
        # its end is where the schedule ends, not a half-trained epoch. An evaluation the deadline cut short
        # read other tokens than the rest: it competes only while there is nothing else to keep.
        if not stats.partial or self.cfg.time_budget is not None or self.cfg.evaluations is not None:
            if whole or self.best.value is None:
                self._consider(value, stats.epoch, schedule)

    def _consider(self, value: float, epoch: int, schedule: Schedule) -> None:
        """Keep the best held-out value (and its weights if selecting); stop early once ``cfg.patience``
        evaluations in a row bring no better one."""
        weights = (
            (lambda: {k: v.detach().clone() for k, v in self.model.state_dict().items()}) if self.select_best else None
        )
        self.best.consider(value, epoch, self.step, weights)
        patience = self.cfg.patience
        if patience is not None and self.best.patience_spent(patience) and schedule.stop_reason is None:
            schedule.stop("early_stopping", self.best.why_stopped(value, self.step, patience))

    def _eval_tokens(self) -> int | None:
        """Held-out tokens a periodic evaluation reads: ``eval_max_tokens``, or the whole split when shorter."""
        if self.heldout_ids is None:
            return None
        n = self.heldout_ids.numel()
        return min(n, self.cfg.eval_max_tokens) if self.cfg.eval_max_tokens is not None else n

    def _heldout_perplexity(self, schedule: Schedule | None = None) -> tuple[float, bool]:
        """Held-out perplexity over the first ``cfg.eval_max_tokens`` held-out tokens (all when unset), or as
        many as the time budget leaves time for, and whether it read them all; the schedule learns the cost."""
        assert self.heldout_ids is not None
        started, deadline = time.perf_counter(), schedule.eval_deadline if schedule is not None else None
        cap, rows = self.cfg.eval_max_tokens, self.cfg.batch_size
        value, read = perplexity_until(self.model, self.heldout_ids, deadline, rows=rows, max_tokens=cap)
        ended = time.perf_counter()
        if schedule is not None:
            schedule.evaluated(ended - started, read)
        # No piece starts past the deadline: one that ended before it read every token it was meant to.
        return value, deadline is None or ended < deadline

    # ----- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the weights needed to continue bit-for-bit: optimizer, RNGs, epoch, steps, best,
        and (taken inside an epoch) the position there (``deeprnn.training.state.Position``)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "python_rng": rng_to_lists(self.rng.getstate()),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **self.best.state_dict(),
            "train_seconds": self._schedule.elapsed() if self._schedule is not None else self.spent_seconds,
            "position": self._pos.to_dict(self.train_step) if self._pos is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict`` (the model's weights are loaded separately, before this).

        Trainer states written before steps were counted (no ``step``) resume with the step count at 0.
        """
        if self.train_step.graph is not None:
            raise RuntimeError("load the trainer state before training starts")
        self.epoch = int(state["epoch"])
        self.step = int(state.get("step") or 0)
        self.optimizer.load_state_dict(optimizer_state(state["optimizer"], self.optimizer, self.device))
        self.rng.setstate(rng_from_lists(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.best = Best.from_state(state, self.device)
        self.spent_seconds = float(state.get("train_seconds") or 0.0)
        self._resume = state.get("position")  # applied when the next epoch begins (after any graph capture)
