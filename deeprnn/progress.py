"""Where a training run stands: steps done of the planned total, speed and time left, as one line.

``Trainer.fit`` reports a ``StepStats`` every time it reads results back from the device (at least every
couple of seconds, also inside a long epoch); ``progress_line`` turns one into the line the train task logs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def format_duration(seconds: float | None) -> str:
    """A short duration: ``"45s"``, ``"12m05s"``, ``"3h07m"``, ``"2d04h"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def progress_line(s: StepStats) -> str:
    """``step 120/900 (13%), epoch 2/10, batch 40/90: train ppl 8.123, held-out ppl 9.01, 25,000 tokens/s,
    ETA 1m05s``."""
    share = f" ({100.0 * s.step / s.total_steps:.0f}%)" if s.total_steps > 0 else ""
    where = f"epoch {s.epoch}/{s.epochs}" + ("" if s.epoch_end else f", batch {s.batch}/{s.batches}")
    held = f", held-out ppl {s.heldout_perplexity:.2f}" if s.heldout_perplexity is not None else ""
    return (
        f"step {s.step:,}/{s.total_steps:,}{share}, {where}: train ppl {s.train_perplexity:.3f}{held}, "
        f"{s.tokens_per_sec:,.0f} tokens/s, ETA {format_duration(s.eta_seconds)}"
    )


def eta_seconds(steps_done: int, total_steps: int, seconds: float) -> float | None:
    """Seconds left for ``total_steps - steps_done`` more steps at the pace of ``steps_done`` in ``seconds``."""
    if steps_done <= 0 or seconds <= 0:
        return None
    return max(total_steps - steps_done, 0) * seconds / steps_done
