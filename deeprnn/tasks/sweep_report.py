"""What a sweep reports: its progress as Prefect artifacts while it runs; at the end its trials ranked, the best
one rolled up to the parent MLflow run with its model registered, and the study's best trial, value and
parameters with Optuna's pictures."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from deeprnn.search.optuna_study import StudySpec
from deeprnn.search.ranking import TrialResult, rank, selection_metric, table_csv, table_markdown
from deeprnn.search.space import parse_space, trial_name
from deeprnn.tasks.results_tasks import PublishedModel, register_version
from deeprnn.tasks.sweep_tasks import ERROR_ATTR, PARENT_ATTR, RUN_ID_ATTR, TrialOutcome, error_text
from deeprnn.tracking import metrics, runs

PROGRESS_KEY = "deeprnn-sweep-progress"
PLOTS = ("plot_optimization_history", "plot_param_importances", "plot_intermediate_values")


class SweepFailedError(RuntimeError):
    """Every trial of the sweep failed."""


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep returns: this run's trials ranked and its best, and the study's best over every run of it."""

    experiment: str
    parent_run_id: str
    search: str  # grid, random or optuna
    study: str
    storage: str  # its password masked
    trials_total: int  # run by this sweep
    trials_finished: int
    trials_pruned: int
    trials_failed: int
    steps_total: int  # training steps of this sweep's trials
    selection_metric: str  # the held-out perplexity the trials are ranked by
    best: TrialResult | None  # this sweep's best finished trial
    best_model: PublishedModel | None  # its model, with its registration unless the sweep registers none
    trials: list[TrialResult]  # ranked, pruned and failed trials last
    study_trials: int  # finished (complete, pruned or failed) in the study, earlier runs' included
    study_best_trial: int | None  # the study's best, by Optuna trial number
    study_best_value: float | None
    study_best_params: dict[str, Any]

    def as_record(self) -> dict[str, Any]:
        """The summary as plain JSON-ready data (``deeprnn sweep --json``)."""
        return asdict(self)


def _counts(outcomes: list[Any]) -> dict[str, int]:
    statuses = Counter(o.row.status if isinstance(o, TrialOutcome) else "FAILED" for o in outcomes)
    counts = {f"trials_{status.lower()}": statuses[status] for status in ("FINISHED", "PRUNED", "FAILED")}
    return {"trials_total": len(outcomes), **counts}


def publish_progress(spec: StudySpec, outcomes: list[Any], planned: int, progress: UUID) -> None:
    """The sweep so far as a Prefect markdown artifact (a new version after each trial): trials done,
    pruned, failed, and the best value so far; ``progress``, a progress artifact, to the share of trials done."""
    update_progress_artifact(progress, 100.0 * len(outcomes) / max(planned, 1))
    finished = [o for o in outcomes if isinstance(o, TrialOutcome) and o.row.status == "FINISHED"]
    best = min(finished, key=lambda o: o.value, default=None)
    shown = f"trial {best.row.index}, held-out perplexity {best.value:.3f} ({best.row.name})" if best else "none yet"
    counts = "finished: {trials_finished}, pruned: {trials_pruned}, failed: {trials_failed}".format(**_counts(outcomes))
    markdown = f"# Study {spec.name}: {len(outcomes)} of {planned} trials done\n\n- {counts}\n- best so far: {shown}"
    create_markdown_artifact(markdown, key=PROGRESS_KEY, description=f"progress of study {spec.name}")


def _collect(spec: StudySpec, study: Any, parent_run_id: str, outcomes: list[Any]) -> list[TrialResult]:
    """One row per trial of this sweep: FINISHED or PRUNED from what its task returned; FAILED from the study
    (its values and error) and its MLflow child run; a trial that failed before the study gave it values, from
    its exception alone."""
    latest: dict[str, runs.RunRecord] = {}
    for child in runs.child_runs(parent_run_id):  # oldest first: a trial Dask re-ran keeps its last run
        latest[child.tags.get("deeprnn.trial", "")] = child
        if child.status == "RUNNING":
            # Every trial has returned or raised by now; a run still open lost its worker mid-way.
            runs.mark_failed(child.run_id, "its Dask worker was lost before the trial returned")
    rows = [o.row for o in outcomes if isinstance(o, TrialOutcome)]
    returned = len(rows)
    dims = parse_space(spec.space).dims
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(PARENT_ATTR) == parent_run_id]
    for t in (t for t in mine if t.state.name == "FAIL" and t.number not in {r.index for r in rows}):
        values = {k: t.params[k] for k in dims if k in t.params}
        child = latest.get(str(t.number))
        error = t.user_attrs.get(ERROR_ATTR) or t.user_attrs.get("deeprnn.fail_reason")
        run_id, row_metrics = (child.run_id, dict(child.metrics)) if child else (None, {})
        rows.append(TrialResult(t.number, trial_name(t.number, values), values, "FAILED", run_id, row_metrics, error))
    errors = [o for o in outcomes if not isinstance(o, TrialOutcome)]
    # The failed trials the study knows have their rows; any left failed before the study gave them values.
    for slot, exc in enumerate(errors[len(rows) - returned :]):
        text = error_text(exc) if isinstance(exc, BaseException) else f"no result: {exc!r}"[:300]
        rows.append(TrialResult(-1, f"slot-{slot}", {}, "FAILED", None, {}, text))
    return rows


def _log_plots(study: Any, parent_run_id: str, log: Callable[[str], None]) -> None:
    """Optuna's matplotlib pictures of the study as PNG files under ``study/`` on the parent run; one it cannot
    draw (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    with tempfile.TemporaryDirectory(prefix="deeprnn-study-") as folder:
        for name in PLOTS:
            try:
                with warnings.catch_warnings(action="ignore"):  # Optuna marks these "experimental"
                    axes = getattr(vis, name)(study)
            except Exception as exc:  # e.g. importances need two finished trials and two parameters
                log(f"{name}: not drawn ({type(exc).__name__}: {exc})")
                continue
            figure = axes.get_figure() if hasattr(axes, "get_figure") else axes.flat[0].get_figure()
            path = Path(folder) / f"{name.removeprefix('plot_')}.png"
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            MlflowClient().log_artifact(parent_run_id, str(path), "study")


def _log_study(
    spec: StudySpec, study: Any, parent_run_id: str, results: list[TrialResult], log: Callable[[str], None]
) -> dict[str, Any]:
    """The study and this sweep's trials on the parent run: the study's best trial (``study_best_value``,
    ``deeprnn.study.best_*`` tags, ``study.json``), ``trials.csv`` and ``trials.md``, Optuna's pictures under
    ``study/``. Returns the study's best trial number, value and parameters as the summary's ``study_best_*``."""
    try:
        best = study.best_trial  # the study's best complete trial, earlier runs' included
    except ValueError:  # no complete trial yet
        number, value, params = None, None, {}
    else:
        number, value, params = best.number, float(best.value), dict(best.params)
        metrics.log_metrics(parent_run_id, {"study_best_value": value})
        best_run = study.trials[number].user_attrs.get(RUN_ID_ATTR, "")
        tags = {"deeprnn.study.best_trial": number, "deeprnn.study.best_run_id": best_run}
        runs.set_tags(parent_run_id, {**tags, **{f"deeprnn.study.best.{k}": v for k, v in params.items()}})
    facts = {"study": spec.name, "storage": spec.shown_storage, "best_trial": number, "best_value": value}
    texts = {"study.json": json.dumps({**facts, "best_params": params}, indent=1, default=str)}
    texts.update({"trials.csv": table_csv(results), "trials.md": table_markdown(results, runs.run_url) + "\n"})
    runs.log_texts(parent_run_id, texts)
    _log_plots(study, parent_run_id, log)
    return {"study_best_trial": number, "study_best_value": value, "study_best_params": params}


def _summary_markdown(
    spec: StudySpec, parent_run_id: str, results: list[TrialResult], best: TrialResult | None, metric: str
) -> str:
    """The Prefect summary artifact: how many trials finished, the parent run, the best, the ranked table."""
    finished = sum(r.succeeded for r in results)
    link = runs.run_url(parent_run_id)
    return "\n\n".join(
        [  # paragraphs
            f"# deeprnn sweep ({spec.search}): {finished} of {len(results)} trials finished",
            f"MLflow parent run: [{parent_run_id}]({link})" if link else f"MLflow parent run: `{parent_run_id}`",
            f"Best: **{best.name}**, {metric.replace('_', ' ')} {best.metrics.get(metric, float('nan')):.3f}"
            if best
            else "No trial finished.",
            f"Trials ranked by {metric.replace('_', ' ')} (pruned and failed trials last):",
            table_markdown(results, runs.run_url),
        ]
    )


def _roll_up_best(
    parent_run_id: str,
    returned: list[TrialOutcome],
    best: TrialResult,
    metric: str,
    register: bool,
    register_as: str | None,
) -> PublishedModel:
    """The best trial's metrics and run on the parent run, and its model, registered as ``register_as`` (or the
    name its corpus gets) when ``register``."""
    # A finished trial's row, so its outcome has its result.
    result = next(o.result for o in returned if o.row.index == best.index and o.result)
    metrics.log_metrics(parent_run_id, {f"best_{k}": v for k, v in best.metrics.items()})
    tags = {"best_trial_run_id": result.run_id, "deeprnn.best_trial": best.name, "deeprnn.selection_metric": metric}
    runs.set_tags(parent_run_id, tags)
    if not register:
        return result.model
    # Once per trial run, also when this task runs again: the version is looked up by run id first.
    registration = register_version(result.model, register_as or result.model.register_as, result.run_id)
    return replace(result.model, registration=registration)


@task(name="summarize-sweep", cache_policy=NO_CACHE)
def summarize_sweep(
    spec: StudySpec,
    experiment: str,
    parent_run_id: str,
    outcomes: list[Any],
    register_best: bool = True,
    registered_model: str | None = None,
) -> SweepSummary:
    """Rank this sweep's trials by held-out perplexity and roll the best up to the parent run (``best_*``
    metrics, ``best_trial_run_id`` tag, its model registered as ``registered_model``, by default the one its
    corpus gets); the study's best trial, value and parameters (``study_best_value`` metric,
    ``deeprnn.study.best_*`` tags, ``study.json``), Optuna's pictures under ``study/``, ``trials.csv`` and
    ``trials.md``, and a Prefect summary.

    ``outcomes`` holds each trial task's result, or its exception when it failed. Raises ``SweepFailedError``
    (after logging the summary) when every trial failed."""
    logger = get_run_logger()
    study = spec.load()
    results = _collect(spec, study, parent_run_id, outcomes)
    metric = selection_metric(results)
    counts = _counts(outcomes)
    returned = [o for o in outcomes if isinstance(o, TrialOutcome)]
    steps = sum(o.row.metrics["steps"] for o in returned)
    finished_in_study = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    metrics.log_metrics(parent_run_id, {**counts, "trials_steps": steps, "study_trials": finished_in_study})
    study_best = _log_study(spec, study, parent_run_id, results, logger.warning)
    ranked = rank(results)
    best = ranked[0] if counts["trials_finished"] else None
    summary = _summary_markdown(spec, parent_run_id, results, best, metric)
    create_markdown_artifact(summary, key="deeprnn-sweep-summary", description="deeprnn sweep summary")
    model = None
    if best is not None:
        model = _roll_up_best(parent_run_id, returned, best, metric, register_best, registered_model)
    done = (counts["trials_finished"], counts["trials_pruned"], counts["trials_failed"])
    logger.info("%d finished, %d pruned, %d failed; best %s", *done, best.name if best else "none")
    for r in results:
        if r.status == "FAILED":
            logger.warning("%s failed: %s", r.name, r.error)
    if best is None and counts["trials_pruned"] == 0:
        first = next((r.error for r in results if r.error), "unknown error")
        raise SweepFailedError(f"all {len(results)} trials failed; the first error: {first}")
    return SweepSummary(
        experiment,
        parent_run_id,
        spec.search,
        spec.name,
        spec.shown_storage,
        **counts,
        steps_total=steps,
        selection_metric=metric,
        best=best,
        best_model=model,
        trials=ranked,
        study_trials=finished_in_study,
        **study_best,
    )
