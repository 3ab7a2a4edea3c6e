"""What else watches a training run's progress, for the caller of the pipeline: a sweep trial's pruner.

``run_pipeline`` is the same for every run, so a caller that needs every held-out measurement (an Optuna
trial reporting to its pruner) sets ``watching(observer)`` around it; the training task calls the observer
from its ``on_step`` hook, after the step is in the MLflow curves. An observer stops the run by raising
``TrialPruned``: the training task flushes the curves and the exception reaches the caller.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

from deeprnn.training.progress import StepStats

StepObserver = Callable[[StepStats], None]

# A context variable: a Dask worker runs several trials in threads, each with its own observer.
_observer: ContextVar[StepObserver | None] = ContextVar("deeprnn_step_observer", default=None)


class TrialPruned(Exception):
    """A sweep's pruner stopped this trial at ``step``: its held-out perplexity fell behind other trials'."""

    def __init__(self, step: int, value: float, reason: str) -> None:
        super().__init__(f"pruned at step {step:,} (held-out perplexity {value:.3f}): {reason}")
        self.step, self.value, self.reason = step, value, reason


@contextlib.contextmanager
def watching(observer: StepObserver) -> Iterator[None]:
    """Call ``observer`` with every progress report of the training run(s) started inside this block."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


def notify(stats: StepStats) -> None:
    """Hand ``stats`` to the observer of this context, if any (it may raise ``TrialPruned``)."""
    observer = _observer.get()
    if observer is not None:
        observer(stats)
