"""Stage 6: the training loop, with the book's semantics (D2L 8.5 ``train_ch8``) and a fast path.

Kept from the book: per epoch a fresh minibatch offset; with sequential partitioning the hidden state starts at
zero each epoch and is carried (detached) from one minibatch to the next; cross-entropy averaged over the
minibatch; the gradient norm clipped as ``grad_clipping`` does; per-epoch perplexity = exp(mean training loss).

What makes it fast without changing those semantics: the token ids live on the training device in the dtype
they come in (an epoch's minibatches are views of them, converted to int64 by the copy into the step's static
buffers); the step never syncs with the host, and on CUDA it is captured once as a CUDA graph and replayed
(``deeprnn.training.step``); the host reads losses and timings (CUDA events) back only every few epochs, to
log, evaluate or checkpoint, or inside a long epoch every ``_SYNC_SECONDS`` and when
``deeprnn.training.schedule`` says an evaluation or checkpoint is due. ``max_steps`` ends training at any
minibatch; a checkpoint taken there carries the position inside the epoch (``Trainer.state_dict``). On the
CPU oneDNN's LSTM kernels stay on (1.5x faster than PyTorch's native ones for the book's shapes,
``bench/train_speed.py --mode kernels``).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from deeprnn.config import TrainConfig
from deeprnn.data.batching import EpochBatches, check_enough_tokens, num_batches
from deeprnn.device import synchronize
from deeprnn.evaluate import perplexity_from_loss, perplexity_until
from deeprnn.model import RNNLM, zero_state_
from deeprnn.training.checkpoint import rng_from_lists
from deeprnn.training.divergence import check_loss, check_weights
from deeprnn.training.progress import EpochStats, FitResult, StepStats, eta_seconds
from deeprnn.training.schedule import Schedule, every
from deeprnn.training.selection import Best
from deeprnn.training.step import TrainStep, mark, seconds_between

_SYNC_SECONDS = 2.0  # read results back at least this often, so progress stays visible on long epochs


@dataclass
class _Pending:
    """An epoch (or its part trained) whose results are still on the device."""

    stats: EpochStats  # its perplexity and speed filled in once read back
    mean_loss: torch.Tensor  # the mean training loss of the epoch (or of its part trained), on the device
    start: Any
    end: Any
    tokens: int


@dataclass
class _Position:
    """The epoch in progress (or the last one trained): what a checkpoint inside it needs
    (``Trainer.state_dict``)."""

    epoch: int
    batch: int  # minibatches done
    batches: int
    rng_before: tuple[Any, ...]  # the Python RNG state before this epoch's minibatches were drawn


@dataclass
class _Run:
    """Bookkeeping of one ``fit`` call: callbacks, schedule, what is not yet read back, and the window since
    the previous progress report (its host time, global step, and the epoch's summed loss and minibatches)."""

    on_epoch: Callable[[EpochStats], None] | None
    on_checkpoint: Callable[[int], None] | None
    on_step: Callable[[StepStats], None] | None
    stop_requested: Callable[[], object] | None  # not None when the run must stop (e.g. a signal)
    schedule: Schedule
    t_start: float
    start_step: int
    last_sync: float
    window_time: float
    window_step: int
    history: list[EpochStats] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)
    window_loss: float = 0.0
    window_batch: int = 0


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
        self.cfg, self.device = cfg, device
        self.model = model.to(device).train()
        # Ids keep the dtype they come in (uint8 from a token cache is 8x smaller than int64): each minibatch
        # becomes int64 when it is copied into the step's buffers, each evaluation chunk when it reaches the model.
        self.train_ids = train_ids.to(device=device)
        self.heldout_ids = heldout_ids
        # Held-out tokens a periodic evaluation reads: eval_max_tokens, or the whole split when shorter.
        self.eval_tokens = None if heldout_ids is None else min(heldout_ids.numel(), cfg.eval_max_tokens or 10**15)
        self.select_best = select_best
        self.rng = random.Random(cfg.seed)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken, across resumes
        self._pos = _Position(0, 0, 0, ())  # the epoch in progress, or the last one trained
        self._resume: dict[str, Any] | None = None  # a position inside an epoch to continue from
        self.best = Best()
        self.spent_seconds = 0.0  # training time before this fit (a resumed run continues its time budget)
        self._schedule: Schedule | None = None  # the running fit's
        self.train_step = TrainStep(self.model, cfg, device)

    @property
    def step_mode(self) -> str:
        """How steps run: ``"cuda-graph"`` once captured, else ``"eager"``."""
        return "eager" if self.train_step.graph is None else "cuda-graph"

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
        schedule = Schedule(cfg, evaluates, checkpoints, checkpoint_every, per_epoch, self.spent_seconds, self.step)
        schedule.eval_tokens = self.eval_tokens or 0
        if self.train_step.use_graph and self.train_step.graph is None and not schedule.finished(self.epoch, self.step):
            self.train_step.capture()
        schedule.begin()  # the time budget counts from here, after the one-off capture
        self._schedule, now = schedule, time.perf_counter()
        run = _Run(on_epoch, on_checkpoint, on_step, stop_requested, schedule, now, self.step, now, now, self.step)
        try:
            while not schedule.finished(self.epoch, self.step):
                self._run_epoch(self.epoch + 1, run)
            synchronize(self.device)
        finally:
            self.spent_seconds, self._schedule = schedule.elapsed(), None
        train_seconds = time.perf_counter() - run.t_start
        if self.select_best and self.best.state is not None:
            self.model.load_state_dict(self.best.state)
        device_seconds = max(sum(h.seconds for h in run.history), 1e-9)  # each epoch's at least 1e-9 s
        return FitResult(
            history=run.history,
            epochs_done=self.epoch,
            final_train_perplexity=run.history[-1].train_perplexity if run.history else math.nan,
            best_epoch=self.best.epoch,
            best_heldout_perplexity=self.best.value,
            train_seconds=train_seconds,
            tokens_per_sec=sum(h.tokens_per_sec * h.seconds for h in run.history) / device_seconds,
            step_mode=self.step_mode,
            precision="bf16" if self.train_step.bf16 else "fp32",
            steps_done=self.step,
            eval_tokens=self.eval_tokens,
            stop_reason=schedule.stop_reason or "",
            stop_detail=schedule.stop_detail,
            best_step=self.best.step,
            evaluations=self.best.evaluations,
        )

    def _run_epoch(self, epoch: int, run: _Run) -> None:
        """Train one epoch (or its rest, or until the step budget is spent), reporting as it goes: inside it
        when due, and after it (or the part the budget allowed) when due.

        The epoch's minibatches are drawn and the carried state reset, or, resuming inside the epoch, the
        minibatches drawn again from the saved RNG state and the carried state and loss so far restored."""
        cfg, step, schedule = self.cfg, self.train_step, run.schedule
        lr = schedule.lr(epoch)
        step.set_lr(lr)
        zero_state_(step.state)  # the book starts every epoch from a zero state
        step.loss_sum.zero_()
        first, resume, self._resume = 0, self._resume, None
        if resume is not None:  # a position inside this epoch (``load_state_dict``)
            self.rng.setstate(rng_from_lists(resume["rng_before"]))  # draw the same minibatches again
            step.restore(resume)
            first = int(resume["batch"])
        rng_before = self.rng.getstate()
        batches = EpochBatches(self.train_ids, cfg.batch_size, cfg.num_steps, cfg.partition, self.rng)
        pos = self._pos = _Position(epoch, first, len(batches), rng_before)
        run.window_loss, run.window_batch = float(step.loss_sum) if first else 0.0, first  # a window starts
        start = mark(self.device)
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
                evaluate, checkpoint = schedule.due_by_steps(self.step)
                stop = run.stop_requested is not None and run.stop_requested() is not None
                if evaluate or checkpoint or stop or time.perf_counter() - run.last_sync > _SYNC_SECONDS:
                    self._report(run, evaluate, checkpoint)
        end = mark(self.device)
        partial = pos.batch < pos.batches
        stats = EpochStats(epoch, math.nan, 0.0, 0.0, lr, None, self.step, partial)
        tokens = (pos.batch - first) * cfg.batch_size * cfg.num_steps
        run.pending.append(_Pending(stats, step.loss_sum / pos.batch, start, end, tokens))
        if not partial:
            self.epoch = epoch
        last = schedule.finished(self.epoch, self.step)
        evaluate, checkpoint = schedule.due_at_epoch_end(epoch, self.step, complete=not partial, last=last)
        now = time.perf_counter()
        if last or evaluate or checkpoint or every(epoch, cfg.log_every) or now - run.last_sync > _SYNC_SECONDS:
            self._report(run, evaluate, checkpoint)

    def _report(self, run: _Run, evaluate: bool, checkpoint: bool) -> None:
        """Read results back: the pending epochs (``on_epoch``), a held-out evaluation when due (the epoch
        this report ends, if it ends one, carries it), a progress report and a checkpoint when due."""
        pos, cfg, schedule = self._pos, self.cfg, run.schedule
        pending, run.pending = run.pending, []
        stats = [p.stats for p in pending]
        if pending:  # their losses and times read back (one sync) and checked
            losses = torch.stack([p.mean_loss for p in pending]).tolist()
            synchronize(self.device)
            for p, loss in zip(pending, losses):
                check_loss(p.stats.epoch, loss)
                p.stats.seconds = max(seconds_between(p.start, p.end), 1e-9)
                p.stats.train_perplexity = perplexity_from_loss(loss)
                p.stats.tokens_per_sec = p.tokens / p.stats.seconds
        held = None
        if evaluate:
            held, whole = self._heldout_perplexity(schedule)
            ended = stats[-1] if stats and stats[-1].epoch == pos.epoch else None
            if ended is not None:
                ended.heldout_perplexity = held
            # An epoch a step budget cut short competes only when the run is planned in steps or time: then
            # its end is where the schedule ends, not a half-trained epoch.
            if not (ended and ended.partial) or cfg.time_budget is not None or cfg.evaluations is not None:
                model = self.model if self.select_best else None
                why = self.best.consider(held, whole, pos.epoch, self.step, model, cfg.patience)
                if why is not None and schedule.stop_reason is None:
                    schedule.stop_reason, schedule.stop_detail = "early_stopping", why
        run.history.extend(stats)
        if run.on_epoch is not None:
            for s in stats:
                run.on_epoch(s)
        self._step_report(run, held)
        if checkpoint:
            check_weights(self.train_step.params, pos.epoch)  # never save NaN weights
            if run.on_checkpoint is not None:
                run.on_checkpoint(self.epoch)
            run.last_sync = schedule.last_checkpoint = time.perf_counter()  # the time-based interval starts again

    def _step_report(self, run: _Run, heldout: float | None) -> None:
        """Hand ``on_step`` the ``StepStats`` of the window since the previous report; the planned total is the
        remaining epochs at this size, or the budget."""
        pos, cfg = self._pos, self.cfg
        loss_sum = float(self.train_step.loss_sum)  # the epoch's so far; syncs with the device
        run.schedule.replan(self.step)  # a time budget's plan, from the throughput so far
        now, count = time.perf_counter(), pos.batch - run.window_batch
        mean = (loss_sum - run.window_loss) / count if count > 0 else None
        check_loss(pos.epoch, mean)
        left = (pos.batches - pos.batch) + (cfg.epochs - pos.epoch) * pos.batches  # the epochs' steps still to take
        total = min(self.step + left, run.schedule.planned)
        tokens = (self.step - run.window_step) * cfg.batch_size * cfg.num_steps
        stats = StepStats(
            self.step,
            total,
            pos.epoch,
            cfg.epochs,
            pos.batch,
            pos.batches,
            train_perplexity=perplexity_from_loss(mean) if mean is not None else math.nan,
            tokens_per_sec=tokens / max(now - run.window_time, 1e-9),
            eta_seconds=eta_seconds(self.step - run.start_step, total - run.start_step, now - run.t_start),
            heldout_perplexity=heldout,
            epoch_end=pos.batch == pos.batches,
        )
        run.window_step, run.window_loss, run.window_batch = self.step, loss_sum, pos.batch
        if run.on_step is not None:
            run.on_step(stats)
        run.last_sync = run.window_time = time.perf_counter()

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

    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the weights needed to continue bit-for-bit: optimizer, RNGs, epoch, steps, best,
        and (taken inside an epoch) the position there: its minibatch, the RNG state its minibatches were drawn
        from, the carried hidden state and the epoch's loss so far."""
        pos = self._pos  # carried only from inside an epoch
        return {
            "epoch": self.epoch,
            "step": self.step,
            "optimizer": self.train_step.optimizer.state_dict(),
            "python_rng": self.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **self.best.state_dict(),
            "train_seconds": self._schedule.elapsed() if self._schedule is not None else self.spent_seconds,
            "position": {**asdict(pos), **self.train_step.carried()} if 0 < pos.batch < pos.batches else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict`` (the model's weights are loaded separately, before this).

        Trainer states written before steps were counted (no ``step``) resume with the step count at 0.
        """
        self.epoch = int(state["epoch"])
        self.step = int(state.get("step") or 0)
        self.train_step.load_optimizer_state(state["optimizer"])
        self.rng.setstate(rng_from_lists(state["python_rng"]))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.best = Best.from_state(state, self.device)
        self.spent_seconds = float(state.get("train_seconds") or 0.0)
        self._resume = state.get("position")  # applied when the next epoch begins (after any graph capture)
