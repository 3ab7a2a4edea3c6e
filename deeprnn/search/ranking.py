"""What the trials of a search produced, ranked by held-out perplexity, as CSV and markdown tables."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class TrialResult:
    """What one trial produced: its MLflow run (if it got that far), status, final metrics or error."""

    index: int
    name: str
    values: dict[str, Any]
    status: str  # FINISHED or FAILED
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        """True when the trial's run finished."""
        return self.status == "FINISHED"


def selection_metric(results: list[TrialResult]) -> str:
    """The held-out perplexity trials are ranked by: validation when every finished trial has one (so the
    test split stays untouched by the choice), else test."""
    done = [r for r in results if r.succeeded]
    if done and all(r.metrics.get("val_perplexity") is not None for r in done):
        return "val_perplexity"
    return "test_perplexity"


def rank(results: list[TrialResult]) -> list[TrialResult]:
    """Finished trials by held-out perplexity (best first), then failed ones by trial number."""
    metric = selection_metric(results)

    def key(r: TrialResult) -> tuple[bool, float, int]:
        score = r.metrics.get(metric, math.nan) if r.succeeded else math.nan
        return (False, score, r.index) if math.isfinite(score) else (True, math.inf, r.index)

    return sorted(results, key=key)


_COLUMNS = ("test_perplexity", "val_perplexity", "final_train_perplexity", "train_seconds")


def table_rows(results: list[TrialResult]) -> list[dict[str, Any]]:
    """One flat row per trial, ranked: trial, status, varied values, perplexities, seconds, run id, error."""
    keys = list(dict.fromkeys(k for r in results for k in r.values))
    metric_keys = [k for k in _COLUMNS if any(k in r.metrics for r in results)]
    return [
        {"trial": r.index, "status": r.status, **{k: r.values.get(k) for k in keys}}
        | {k: r.metrics.get(k) for k in metric_keys}
        | {"run_id": r.run_id or "", "error": r.error or ""}
        for r in rank(results)
    ]


def table_csv(results: list[TrialResult]) -> str:
    """The ranked trials as CSV text."""
    rows = table_rows(results)
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def table_markdown(results: list[TrialResult], link: Callable[[str], str | None] | None = None) -> str:
    """The ranked trials as a markdown table; ``link(run_id)`` turns run ids into links where it can."""
    rows = table_rows(results)
    if not rows:
        return "(no trials)"

    def cell(col: str, value: Any) -> str:
        if col == "run_id" and value:
            url = link(value) if link else None
            return f"[{value[:12]}]({url})" if url else f"`{value}`"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value if value is not None else "").replace("|", "\\|").replace("\n", " ")

    lines = [list(rows[0]), ["---"] * len(rows[0])] + [[cell(c, v) for c, v in row.items()] for row in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
