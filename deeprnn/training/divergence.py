"""Divergence checks: a NaN or infinite loss or weight ends training with one clear error.

The loss is checked every time it is read back from the device (per epoch and inside long epochs), the
weights before every checkpoint: an epoch's mean loss is measured before its last update, so a finite loss
does not prove that the weights after it are finite, and a checkpoint must never save NaN weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class TrainingDivergedError(RuntimeError):
    """The training loss (or a weight) became NaN or infinite."""

    def __init__(self, epoch: int, value: float, what: str | None = None) -> None:
        super().__init__(
            f"training diverged at epoch {epoch}: {what or f'the mean loss was {value}'}. Lower --lr (or "
            "--weight-decay) and keep gradient clipping on (--clip-norm); checkpoints written before this "
            "epoch are kept"
        )
        self.epoch = epoch


def check_loss(epoch: int, value: float | None) -> None:
    """Raise ``TrainingDivergedError`` when the mean loss ``value`` of ``epoch`` is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        raise TrainingDivergedError(epoch, value)


def check_weights(params: Sequence[torch.Tensor], epoch: int) -> None:
    """Raise ``TrainingDivergedError`` when a weight is NaN or infinite (one host sync)."""
    if not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
        raise TrainingDivergedError(epoch, math.nan, "the weights became NaN or infinite")
