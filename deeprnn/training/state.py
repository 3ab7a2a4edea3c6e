"""What a ``Trainer`` saves to continue bit-for-bit, in types ``torch.load(weights_only=True)`` accepts.

Besides the optimizer, the RNGs, the counters and the best epoch, a checkpoint taken inside an epoch carries
its ``Position``: the minibatch reached, the Python RNG state the epoch's minibatches were drawn from (so a
resume draws the same ones again), the carried hidden state and the epoch's loss so far.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from deeprnn.model import copy_state_, state_tensors
from deeprnn.training.step import TrainStep


@dataclass
class Position:
    """The epoch in progress: what a checkpoint inside it needs to continue from the same minibatch."""

    epoch: int
    batch: int  # minibatches done
    batches: int
    rng_before: list[Any]  # the Python RNG state before this epoch's minibatches were drawn

    def to_dict(self, step: TrainStep) -> dict[str, Any] | None:
        """The position with ``step``'s carried state and summed loss; None at an epoch boundary."""
        if self.batch in (0, self.batches):  # nothing to carry
            return None
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "rng_before": self.rng_before,
            "state": [t.detach().to("cpu", copy=True) for t in state_tensors(step.state)],
            "loss_sum": step.loss_sum.detach().to("cpu", copy=True),
        }


def restore_position(saved: dict[str, Any], step: TrainStep) -> int:
    """Put a saved position's carried state and loss so far back into ``step``; returns the minibatches done."""
    copy_state_(step.state, tuple(saved["state"]))
    step.loss_sum.copy_(saved["loss_sum"])
    return int(saved["batch"])


def optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """A copy of a saved optimizer state for ``optimizer``, with learning rates as tensors where it keeps them
    as tensors (the CUDA graph path with a schedule), whichever way the state was saved."""
    state = copy.deepcopy(saved)  # the optimizer may keep the saved tensors themselves: never share them
    if torch.is_tensor(optimizer.param_groups[0]["lr"]):
        for group in state["param_groups"]:
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(group["lr"], device=device)
    return state


def rng_to_lists(state: tuple[Any, ...]) -> list[Any]:
    """``random.Random``'s state as plain lists, which ``torch.load(weights_only=True)`` accepts."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_from_lists(state: list[Any]) -> tuple[Any, ...]:
    """The inverse of ``rng_to_lists``."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
