"""Budgets and schedules of one ``fit``: the learning rate of each epoch or step, when training stops (the
epochs, the step budget ``max_steps``, the time budget ``time_budget``, or early stopping), and which steps
and epochs are due for a held-out evaluation or a checkpoint.

Evaluations come every ``eval_every`` epochs and every ``eval_every_steps`` steps (or ``evaluations`` spread
over the planned steps); checkpoints every ``checkpoint_every`` epochs, every ``checkpoint_every_steps``
steps and every ``checkpoint_every_minutes`` of training; both also at the very end. An epoch that a budget
cuts short counts as the end, never as a whole epoch of the per-epoch schedules.

A time budget is turned into a number of steps (``Schedule.planned``): the training throughput is measured
over the first seconds (``_MEASURE_SECONDS``), then over a moving window of the recent read-backs (evaluations
left out, their cost counted apart), and the plan is refined at every read-back, so the warm-up and cosine
schedule (``lr_schedule = "warmup-cosine"``) reaches its end when the time does, also when the machine slows
down or speeds up mid-run. Training stops before a step that would not end before the time kept for the last
evaluation, which is estimated from the recent speed; an evaluation reads its held-out text only while the
budget lasts (``Schedule.eval_deadline``: a small grace past its end), so the budget holds, evaluations
included.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from deeprnn.config import TrainConfig

# Throughput is measured over at most this long (or a twentieth of the budget) before the first plan.
_MEASURE_SECONDS = 5.0
# warmup-cosine decays to this share of the peak learning rate.
_FINAL_LR_SHARE = 0.1
# warmup-stable-decay decays over this last share of the planned steps (the stable phase before it runs at the
# peak, so a plan refined late changes little).
_DECAY_SHARE = 0.2
# Periodic evaluations may take at most this share of a time budget (fewer than ``evaluations`` if need be).
_EVAL_SHARE = 0.08
# The moving window the throughput is measured over: this share of the budget, within these bounds in seconds
# (short enough to follow a change of load, long enough to span a few read-backs).
_WINDOW_SHARE, _WINDOW_BOUNDS = 0.1, (4.0, 60.0)
# An evaluation may run this share of the budget past its end before it stops reading (a shorter read is a
# noisier estimate, and the best weights are chosen on it).
_EVAL_GRACE = 0.03
# The next step may take this many times the recent mean (a busy machine's steps vary): no step starts
# unless that much time is left before the last evaluation.
_STEP_MARGIN = 1.25
# Before the first evaluation: an evaluation (forward passes only, no backward pass or optimizer) reads about
# three times as many tokens a second as training; afterwards the measured ratio.
_EVAL_SPEEDUP = 3.0


class _Mark(NamedTuple):
    """A read-back: the global step, the time, and the evaluation seconds spent before it."""

    step: int
    time: float
    eval_seconds: float


@dataclass
class Schedule:
    """When a fit changes the learning rate, evaluates, checkpoints and stops.

    ``spent_seconds``: training time of this run before this fit (a resumed run continues its time budget).
    """

    cfg: TrainConfig
    evaluates: bool  # there is held-out text to evaluate on
    checkpoints: bool  # the caller takes checkpoints
    checkpoint_every: int | None = None  # epochs between checkpoints (None: by steps, by time and at the end)
    batches_per_epoch: int = 0
    spent_seconds: float = 0.0
    start_step: int = 0
    eval_tokens: int = 0  # held-out tokens one periodic evaluation reads
    planned: int = 0  # the global step training ends at (refined while a time budget runs)
    eval_interval: int | None = None  # steps between evaluations (eval_every_steps, or from ``evaluations``)
    stop_reason: str | None = None  # set once training must end
    stop_detail: str = ""
    _started: float = field(default_factory=time.perf_counter)
    _marks: deque[_Mark] = field(default_factory=deque)  # the read-backs of the moving window
    _step_seconds: float | None = None  # training seconds per step over the window (None: not measured yet)
    last_checkpoint: float = field(default_factory=time.perf_counter)  # when the time-based interval started
    _eval_seconds: float | None = None  # the last evaluation's duration
    _eval_total: float = 0.0  # seconds spent in evaluations during this fit
    _eval_speedup: float = _EVAL_SPEEDUP  # evaluation tokens a second over training tokens a second

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.planned = self._bound
        self.eval_interval = cfg.eval_every_steps
        if self.eval_interval is None and cfg.evaluations and cfg.time_budget is None:
            self.eval_interval = self._spread(cfg.evaluations)

    @property
    def _bound(self) -> int:
        """The global step the epochs and ``max_steps`` end training at (10**12 when neither is known)."""
        return min(self.cfg.epochs * self.batches_per_epoch or 10**12, self.cfg.max_steps or 10**12)

    # ----- budgets ------------------------------------------------------------------------------------
    @property
    def deadline(self) -> float | None:
        """``time.perf_counter()`` at which the time budget is spent; None without one."""
        return None if self.cfg.time_budget is None else self._started + self.cfg.time_budget - self.spent_seconds

    @property
    def eval_deadline(self) -> float | None:
        """When an evaluation stops reading: ``_EVAL_GRACE`` of the budget past its end, so that an evaluation
        the time kept back was meant for reads its tokens whole, and only one slowed down past that is cut."""
        deadline = self.deadline
        return None if deadline is None else deadline + _EVAL_GRACE * (self.cfg.time_budget or 0.0)

    def elapsed(self) -> float:
        """Training seconds of the run so far, earlier fits included."""
        return self.spent_seconds + time.perf_counter() - self._started

    def evaluated(self, seconds: float, tokens: int = 0) -> None:
        """An evaluation read ``tokens`` held-out tokens in ``seconds``: its cost is kept out of the training
        throughput, and the next evaluations' costs are estimated from it."""
        self._eval_seconds = seconds
        self._eval_total += seconds
        if tokens > 0 and seconds > 0 and self._step_seconds is not None:
            train_rate = self.cfg.batch_size * self.cfg.num_steps / self._step_seconds
            self._eval_speedup = tokens / seconds / train_rate

    def eval_cost(self) -> float:
        """Estimated seconds of one periodic evaluation at the recent training speed (0 when unknown)."""
        if self._step_seconds is None:
            return self._eval_seconds or 0.0
        return self.eval_tokens * self._step_seconds / (self._eval_speedup * self.cfg.batch_size * self.cfg.num_steps)

    def replan(self, step: int) -> None:
        """Refine the planned steps from the recent throughput (with a time budget; at read-backs)."""
        deadline, now = self.deadline, time.perf_counter()
        if deadline is None or self.stop_reason is not None:
            return
        budget = self.cfg.time_budget or 0.0
        self._marks.append(_Mark(step, now, self._eval_total))
        if len(self._marks) == 1:  # the first read-back: startup costs stay out of the measurement
            return
        window = min(max(_WINDOW_SHARE * budget, _WINDOW_BOUNDS[0]), _WINDOW_BOUNDS[1])
        while len(self._marks) > 2 and self._marks[1].time <= now - window:
            self._marks.popleft()  # the newest mark at least a window old stays as the base
        base = self._marks[0]
        training = now - base.time - (self._eval_total - base.eval_seconds)
        first = len(self._marks) == 2 and self._step_seconds is None
        if step <= base.step or training <= 0 or (first and now - base.time < min(_MEASURE_SECONDS, 0.05 * budget)):
            if first:
                self._marks.pop()  # too early to measure: keep measuring from the first read-back
            return
        self._step_seconds = training / (step - base.step)
        self._plan(step, now, deadline)

    def _plan(self, step: int, now: float, deadline: float) -> None:
        """The planned steps and the evaluations' spread from the measured seconds a step."""
        assert self._step_seconds is not None
        cost = self.eval_cost()
        left = max(deadline - now - (cost if self.evaluates else 0.0), 0.0)  # time kept for the last evaluation
        per_step = self._step_seconds  # and a share of each periodic evaluation still to come
        if self.evaluates and self.eval_interval:
            per_step += cost / self.eval_interval
        self.planned = max(step + 1, min(self._bound, step + int(left / per_step)))
        if self.cfg.evaluations and self.cfg.eval_every_steps is None:
            affordable = int(_EVAL_SHARE * (self.cfg.time_budget or 0.0) / max(cost, 1e-9))
            self.eval_interval = self._spread(max(1, min(self.cfg.evaluations, affordable)))

    def _spread(self, evaluations: int) -> int:
        """Steps between evaluations for ``evaluations`` (at least 1) over the planned steps."""
        return max(1, (self.planned - self.start_step) // evaluations)

    def begin(self) -> None:
        """Start the clocks (the time budget, the time between checkpoints) now."""
        self._started = self.last_checkpoint = time.perf_counter()

    def budget_spent(self, step: int) -> bool:
        """Whether training must end after ``step`` steps: a budget is spent, or it was stopped."""
        if self.stop_reason is not None:
            return True
        if self.cfg.max_steps is not None and step >= self.cfg.max_steps:
            self.stop_reason = "max_steps"
            return True
        deadline = self.deadline
        if deadline is None:
            return False
        # The next step must end before the time kept for the last evaluation.
        left = deadline - time.perf_counter() - (self.eval_cost() if self.evaluates else 0.0)
        if step >= self.planned and self._step_seconds is not None and left > 3 * self._step_seconds:
            # Planned at a slower moment than this one: the steps that still fit, at the recent speed.
            self.planned = step + int(left / self._step_seconds) - 1
        if step >= self.planned or left <= _STEP_MARGIN * (self._step_seconds or 0.0):
            self.stop_reason, self.planned = "time_budget", step  # the plan's last word: the steps taken
            return True
        return False

    def finished(self, epochs_done: int, step: int) -> bool:
        """All epochs done, or a budget spent, or stopped."""
        if not self.budget_spent(step) and epochs_done >= self.cfg.epochs:
            self.stop_reason = "epochs"  # budget_spent is False only while no stop reason is set
        return self.stop_reason is not None

    # ----- learning rate ------------------------------------------------------------------------------
    @property
    def per_step(self) -> bool:
        """Whether the learning rate changes at every step (else once per epoch)."""
        return self.cfg.lr_schedule in ("warmup-cosine", "warmup-stable-decay")

    def lr(self, epoch: int) -> float:
        """Learning rate for a 1-based epoch: constant, or cosine from ``lr`` towards 0."""
        if self.cfg.lr_schedule == "cosine":
            return self.cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.cfg.epochs))
        return self.cfg.lr

    def step_lr(self, step: int) -> float:
        """Learning rate of 0-based global step ``step``: a linear warm-up, then (warmup-cosine) cosine decay to
        a tenth of the peak at the planned end, or (warmup-stable-decay) the peak until the last
        ``_DECAY_SHARE`` of the plan and the same cosine decay over that."""
        peak, total = self.cfg.lr, max(self.planned, 1)
        warmup = min(self.cfg.warmup_steps, total // 10)
        if step < warmup:
            return peak * (step + 1) / warmup
        start = warmup
        if self.cfg.lr_schedule == "warmup-stable-decay":
            start = max(warmup, int(total * (1.0 - _DECAY_SHARE)))
            if step < start:
                return peak
        progress = min((step - start) / max(total - start, 1), 1.0)
        floor = peak * _FINAL_LR_SHARE
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    # ----- evaluations and checkpoints ----------------------------------------------------------------
    def due_by_steps(self, step: int) -> tuple[bool, bool]:
        """Whether optimizer step ``step`` is due for a held-out evaluation, and for a checkpoint (by steps,
        or by the time since the last checkpoint)."""
        minutes = self.cfg.checkpoint_every_minutes
        by_time = bool(minutes) and time.perf_counter() - self.last_checkpoint >= 60.0 * float(minutes or 0)
        return (
            self.evaluates and every(step, self.eval_interval),
            self.checkpoints and (every(step, self.cfg.checkpoint_every_steps) or by_time),
        )

    def due_at_epoch_end(self, epoch: int, step: int, complete: bool, last: bool) -> tuple[bool, bool]:
        """After ``epoch`` (``complete``, or cut short by the budget) at ``step``; ``last``: training ends here."""
        evaluate, checkpoint = self.due_by_steps(step)
        return (
            self.evaluates and (last or evaluate or (complete and every(epoch, self.cfg.eval_every))),
            self.checkpoints and (last or checkpoint or (complete and every(epoch, self.checkpoint_every))),
        )


def every(count: int, n: int | None) -> bool:
    """True when ``n`` is set and ``count`` is one of its multiples."""
    return n is not None and count % n == 0
