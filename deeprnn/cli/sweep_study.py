"""``deeprnn sweep --search optuna``: the adaptive sweep's own checks, launch and report."""

from __future__ import annotations

import os
from typing import Any, Callable

from rich.table import Table

from deeprnn.cli.output import console, fail, write_json

ON_INTERRUPT = "the sweep's MLflow run is marked KILLED; the study keeps its finished trials"


def check_study(preset: str, fixed: dict[str, Any], space: dict[str, Any], options: dict[str, Any]) -> Any:
    """The study to run, checked before anything starts: sampler, pruner, space (and its ends as
    configurations), the storage opened, and a study of that name holding the same search. Exits 2 saying
    why when any is wrong."""
    from deeprnn.data.urls import has_password, is_masked
    from deeprnn.flows.study_flow import study_spec, study_storage
    from deeprnn.search.optuna_study import check_storage
    from deeprnn.search.space import SearchSpaceError

    given = options["storage"]
    try:
        # A URL with its password stays in this process; anything else reads as the flow reads it (secret:NAME).
        storage = given if given and has_password(given) and not is_masked(given) else study_storage(given)
        spec = study_spec(
            space, preset, fixed, options["study"], storage, options["sampler"], options["pruner"], options["seed"]
        )  # fmt: skip
        check_storage(spec)  # reads the study, writes nothing: the flow writes once the sweep runs
    except (SearchSpaceError, ValueError) as exc:  # StudyError is a ValueError, as is an unknown preset
        fail(str(exc))
    return spec


def run_study(
    spec: Any, fixed: dict[str, Any], options: dict[str, Any], runner: Any, invoke: Callable[..., Any]
) -> None:
    """Run the adaptive sweep flow on ``runner`` and print its trials and the study's best.

    The flow run's ``storage`` parameter is the URL with its password masked (Prefect keeps and shows
    parameters); the flow, in this process, and the local Dask workers it starts read the URL itself from
    ``DEEPRNN_OPTUNA_STORAGE``."""
    from deeprnn.flows.study_flow import STORAGE_ENV, sweep_study

    if spec.shown_storage != spec.storage:
        os.environ[STORAGE_ENV] = spec.storage
    parameters = dict(space=spec.space, preset=spec.preset, data=fixed.get("data"), train=fixed.get("train"))
    parameters.update(study=spec.name, storage=spec.shown_storage, sampler=spec.sampler, pruner=spec.pruner)
    for key in ("max_trials", "seed", "experiment", "runs_dir", "register_best", "registered_model"):
        parameters[key] = options[key]
    result = invoke(lambda: sweep_study.with_options(task_runner=runner)(**parameters), ON_INTERRUPT)
    print_study(result)
    write_json(result.as_record(), options["json_out"])


def print_study(result: Any) -> None:
    """This sweep's trials ranked, and the study's best over every sweep of it."""
    table = Table(title=f"study {result.study}: MLflow parent run {result.parent_run_id}", show_header=True)
    for column in ("trial", "status", "held-out ppl", "steps", "run id", "note"):
        table.add_column(column)
    for t in result.trials:
        score = t.metrics.get("val_perplexity", t.metrics.get("test_perplexity"))
        steps = t.metrics.get("steps")
        table.add_row(
            t.name, t.status, "" if score is None else f"{score:.3f}", "" if steps is None else f"{int(steps):,}",
            t.run_id or "", t.error or "",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"{result.trials_finished} finished, {result.trials_pruned} pruned, {result.trials_failed} failed "
        f"({result.steps_total:,} training steps); the study holds {result.study_trials} finished trials"
    )
    if result.best_trial is not None:
        console.print(f"study best: trial {result.best_trial}, {result.best_value:.3f}, {result.best_params}")
    registered = result.best_model.registration if result.best_model else None
    if registered:
        console.print(f"registered {registered.registered_model} v{registered.version}")
