"""What training reports: per epoch (``EpochStats``), per fit (``FitResult``), and where a running fit stands
(``StepStats``: steps done of the planned total, speed and time left, as one line).

``Trainer.fit`` reports a ``StepStats`` every time it reads results back from the device (at least every
couple of seconds, also inside a long epoch); ``progress_line`` turns one into the line the train task logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deeprnn.durations import format_duration


@dataclass
class EpochStats:
    """What one epoch produced."""

    epoch: int  # 1-based
    train_perplexity: float
    tokens_per_sec: float
    seconds: float
    lr: float
    heldout_perplexity: float | None = None
    step: int = 0  # optimizer steps done in total at the end of this epoch (0: not recorded)
    partial: bool = False  # the step budget ended training inside this epoch: its numbers cover the part done


@dataclass(frozen=True, kw_only=True)
class FitSummary:
    """What training measured: shared by ``FitResult`` (one ``fit`` call) and ``pipeline.TrainingOutcome``
    (the training stage of a run, across resumes)."""

    history: list[EpochStats]
    epochs_done: int
    steps_done: int  # optimizer steps in total, across resumes
    final_train_perplexity: float
    best_epoch: int | None
    best_heldout_perplexity: float | None
    train_seconds: float
    tokens_per_sec: float
    step_mode: str  # 'cuda-graph' or 'eager'
    precision: str  # 'bf16' (autocast) or 'fp32'
    # Why training ended: epochs, max_steps, time_budget or early_stopping ("" where not recorded).
    stop_reason: str = ""
    stop_detail: str = ""  # early stopping: at which evaluation and why
    best_step: int | None = None  # the global step of the best held-out evaluation
    evaluations: int = 0  # held-out evaluations during training


@dataclass(frozen=True, kw_only=True)
class FitResult(FitSummary):
    """The outcome of ``Trainer.fit``."""

    eval_tokens: int | None = None  # held-out tokens each periodic evaluation read (the cap, or fewer)


@dataclass
class StepStats:
    """One progress report of a running ``fit``."""

    step: int  # optimizer steps done in total (across resumes)
    total_steps: int  # planned: max_steps, or the steps the remaining epochs take (estimated from this one)
    epoch: int  # the epoch in progress, or just finished (1-based)
    epochs: int
    batch: int  # minibatches done in that epoch
    batches: int  # minibatches in that epoch
    train_perplexity: float  # over the steps since the previous report
    tokens_per_sec: float  # over the steps since the previous report
    eta_seconds: float | None  # time left at the average pace of this fit so far; None before any pace is known
    heldout_perplexity: float | None = None  # measured at this step
    epoch_end: bool = False  # reported at the end of ``epoch`` (else inside it)


def progress_line(s: StepStats) -> str:
    """``step 120/900 (13%), epoch 2/10, batch 40/90: train ppl 8.123, held-out ppl 9.01, 25,000 tokens/s,
    ETA 1m05s``."""
    share = f" ({100.0 * s.step / s.total_steps:.0f}%)" if s.total_steps > 0 else ""
    where = f"epoch {s.epoch}/{s.epochs}" + ("" if s.epoch_end else f", batch {s.batch}/{s.batches}")
    held = f", held-out ppl {s.heldout_perplexity:.2f}" if s.heldout_perplexity is not None else ""
    train = f"train ppl {s.train_perplexity:.3f}" if math.isfinite(s.train_perplexity) else "no new steps"
    return (
        f"step {s.step:,}/{s.total_steps:,}{share}, {where}: {train}{held}, "
        f"{s.tokens_per_sec:,.0f} tokens/s, ETA {format_duration(s.eta_seconds, short=True)}"
    )


def eta_seconds(steps_done: int, total_steps: int, seconds: float) -> float | None:
    """Seconds left for ``total_steps - steps_done`` more steps at the pace of ``steps_done`` in ``seconds``."""
    return max(total_steps - steps_done, 0) * seconds / steps_done if steps_done > 0 and seconds > 0 else None
