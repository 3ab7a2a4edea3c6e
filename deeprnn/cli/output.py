"""What the commands print: one-line errors, result tables, JSON files."""

from __future__ import annotations

import json
import typing
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from deeprnn.ops.password_scrub import scrub

if typing.TYPE_CHECKING:
    from deeprnn.tasks.results_tasks import RunResult
    from deeprnn.tasks.sweep_report import SweepSummary

console = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr, any password of a URL in play masked, and exit with ``code`` (2: bad
    input, 1: the work failed)."""
    # As written: no markup read into it, and no line breaks added at the terminal's width (paths stay whole).
    err.print(Text.assemble(("error:", "red"), " ", scrub(message)), soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str | None) -> None:
    """Print ``warning: message`` on stderr (nothing when there is no message)."""
    if message:
        err.print(Text.assemble(("warning:", "yellow"), " ", scrub(message)), soft_wrap=True)


def write_json(result: Any, path: str | None) -> None:
    """Save a command's result as JSON when ``--json PATH`` was given."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)


def print_line(text: str) -> None:
    """One line as written: no markup, no highlighting, no line breaks added at the terminal's width (a path
    or a run id stays whole: the terminal may fold it on screen, a pipe or a log gets it in one piece)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_rows(title: str, rows: dict[str, str]) -> None:
    """A title, then one indented ``key  value`` line per row, keys aligned; values are never cut."""
    print_line(title)
    width = max(map(len, rows), default=0)
    for key, value in rows.items():
        print_line(f"  {key:<{width}}  {value}")


def print_result(result: RunResult) -> None:
    """A training run's metrics, device, model and samples."""
    print_line(f"MLflow run {result.run_id}")  # whole, not a table title that wraps at the table's width
    table = Table("metric", Column("value", justify="right"))
    for key, value in result.metrics().items():
        if value is not None:
            table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    trained = result.training
    table.add_row("device / steps", f"{trained.device} / {trained.step_mode} / {trained.precision}")
    console.print(table)
    line = f"model: {result.model.logged.model_uri}"
    registered = result.model.registration
    if registered:
        champion = ", now champion" if registered.champion else ""
        line += f" (registered {registered.registered_model} v{registered.version}{champion})"
    print_line(line)
    for text in result.samples.values():
        console.print(f"  {text}", style="green", highlight=False, markup=False, soft_wrap=True)
    print_line(f"run id: {result.run_id}")


def print_sweep(result: SweepSummary) -> None:
    """A sweep's trials ranked by its selection metric, its best, and the study's best over every run of it."""
    metric = result.selection_metric
    print_line(f"MLflow parent run {result.parent_run_id} (ranked by {metric})")
    # The run id whole: it is what `deeprnn run --resume` takes; the note: why a trial failed, or where the
    # pruner stopped it.
    table = Table(
        "trial", "status", metric, Column("run id", no_wrap=True, min_width=32), Column("note", overflow="fold")
    )
    for t in result.trials:
        score = t.metrics.get(metric)
        table.add_row(t.name, t.status, "" if score is None else f"{score:.3f}", t.run_id or "", scrub(t.error or ""))
    console.print(table)
    if result.best is not None:
        registered = result.best_model.registration if result.best_model else None
        print_line(
            f"best: {result.best.name} (run {result.best.run_id})"
            + (f", registered {registered.registered_model} v{registered.version}" if registered else "")
        )
    console.print(
        f"{result.trials_finished} of {result.trials_total} trials finished, {result.trials_pruned} pruned, "
        f"{result.trials_failed} failed ({result.steps_total:,} training steps)"
    )
    console.print(f"the study holds {result.study_trials} finished trials")
    if result.study_best_trial is not None:
        print_line(
            f"study best: trial {result.study_best_trial}, {result.study_best_value:.3f}, {result.study_best_params}"
        )
