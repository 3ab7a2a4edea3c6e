"""Model selection on held-out text: the best evaluation so far (its value, step and, when selecting, its
weights) and early stopping after ``patience`` evaluations in a row without a better value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# The fields a trainer state keeps, under these keys (older states lack the counters: they start at 0).
_KEYS = dict(
    epoch="best_epoch", value="best_value", step="best_step", evaluations="evaluations", stale="stale_evaluations"
)


@dataclass
class Best:
    """The best held-out evaluation of a fit so far, and how many evaluations came since without beating it."""

    epoch: int | None = None
    value: float | None = None
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    step: int | None = None
    evaluations: int = 0  # held-out evaluations so far
    stale: int = 0  # evaluations in a row without a better value

    def consider(
        self, value: float, whole: bool, epoch: int, step: int, model: torch.nn.Module | None, patience: int | None
    ) -> str | None:
        """Count an evaluation; keep it (and a copy of ``model``'s weights, when given) if it is the best. An
        evaluation the deadline cut short (not ``whole``) read other tokens than the rest: it counts only while
        there is nothing else to keep. Returns why to stop early once ``patience`` evaluations in a row have not beaten
        the best (for the logs and MLflow), else None."""
        if not whole and self.value is not None:
            return None
        self.evaluations += 1
        self.stale += 1
        if self.value is None or value < self.value:
            self.epoch, self.value, self.step, self.stale = epoch, value, step, 0
            if model is not None:
                self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if patience is None or self.stale < patience:
            return None
        return (
            f"held-out perplexity {value:.3f} at evaluation {self.evaluations} (step {step:,}) is no better than "
            f"{self.value:.3f} (step {self.step or 0:,}) for {patience} evaluations in a row"
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the selection (weights on the CPU)."""
        weights = {k: v.to("cpu") for k, v in self.state.items()} if self.state else None
        return {key: getattr(self, name) for name, key in _KEYS.items()} | {"best_state": weights}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Best:
        """The selection kept in a trainer state (``state_dict``); older states without the counters load too."""
        best = cls(**{name: state[key] for name, key in _KEYS.items() if key in state})
        weights = state.get("best_state")
        best.state = {k: v.to(device) for k, v in weights.items()} if weights else None
        return best
