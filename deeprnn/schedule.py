"""Budgets and schedules of one ``fit``: the learning rate of each epoch, when training stops (the epochs, or
the step budget ``max_steps``), and which steps and epochs are due for a held-out evaluation or a checkpoint.

Evaluations come every ``eval_every`` epochs and every ``eval_every_steps`` steps; checkpoints every
``checkpoint_every`` epochs and every ``checkpoint_every_steps`` steps; both also at the very end. An epoch
that the step budget cuts short counts as the end, never as a whole epoch of the per-epoch schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deeprnn.config import TrainConfig


@dataclass(frozen=True)
class Due:
    """What the step just taken (or the epoch just ended) is due for."""

    evaluate: bool
    checkpoint: bool


@dataclass(frozen=True)
class Schedule:
    """When a fit changes the learning rate, evaluates, checkpoints and stops."""

    cfg: TrainConfig
    evaluates: bool  # there is held-out text to evaluate on
    checkpoints: bool  # the caller takes checkpoints
    checkpoint_every: int | None = None  # epochs between checkpoints (None: by steps and at the end only)

    def lr(self, epoch: int) -> float:
        """Learning rate for a 1-based epoch: constant, or cosine from ``lr`` towards 0."""
        if self.cfg.lr_schedule == "cosine":
            return self.cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.cfg.epochs))
        return self.cfg.lr

    def budget_spent(self, step: int) -> bool:
        """Whether ``step`` optimizer steps use up the step budget."""
        return self.cfg.max_steps is not None and step >= self.cfg.max_steps

    def finished(self, epochs_done: int, step: int) -> bool:
        """All epochs done, or the step budget spent."""
        return epochs_done >= self.cfg.epochs or self.budget_spent(step)

    def due_by_steps(self, step: int) -> Due:
        """Whether optimizer step ``step`` is due for a held-out evaluation, and for a checkpoint."""
        return Due(
            self.evaluates and every(step, self.cfg.eval_every_steps),
            self.checkpoints and every(step, self.cfg.checkpoint_every_steps),
        )

    def due_at_epoch_end(self, epoch: int, step: int, complete: bool, last: bool) -> Due:
        """After ``epoch`` (``complete``, or cut short by the budget) at ``step``; ``last``: training ends here."""
        by_steps = self.due_by_steps(step)
        by_epochs = Due(
            complete and every(epoch, self.cfg.eval_every), complete and every(epoch, self.checkpoint_every)
        )
        return Due(
            self.evaluates and (last or by_steps.evaluate or by_epochs.evaluate),
            self.checkpoints and (last or by_steps.checkpoint or by_epochs.checkpoint),
        )

    def logs_at(self, epoch: int) -> bool:
        """Whether the end of ``epoch`` is due for a progress report (every ``log_every`` epochs)."""
        return every(epoch, self.cfg.log_every)


def every(count: int, n: int | None) -> bool:
    """True when ``n`` is set and ``count`` is one of its multiples."""
    return n is not None and count % n == 0
