"""What an adaptive sweep reports: the study's progress as a Prefect artifact while it runs, and at the end its
best trial, value and parameters with Optuna's pictures on the parent MLflow run, the trials table, and the
best trial's model registered."""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from uuid import UUID

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from deeprnn.search.optuna_study import StudySpec
from deeprnn.search.ranking import TrialResult, table_csv, table_markdown
from deeprnn.tasks.results_tasks import PublishedModel
from deeprnn.tasks.study_tasks import StudyTrialOutcome
from deeprnn.tasks.sweep_tasks import SweepFailedError, roll_up_best
from deeprnn.tracking import metrics, runs

PROGRESS_KEY = "deeprnn-study-progress"
PLOTS = ("plot_optimization_history", "plot_param_importances", "plot_intermediate_values")


@dataclass(frozen=True)
class StudySummary:
    """What an adaptive sweep returns: this run's trials, and the study's best over every run of it."""

    study: str
    storage: str  # its password masked
    parent_run_id: str
    trials_total: int  # started by this sweep
    trials_finished: int
    trials_pruned: int
    trials_failed: int
    study_trials: int  # finished (complete, pruned or failed) in the study, earlier sweeps' included
    best_trial: int | None  # the study's best, by Optuna trial number
    best_value: float | None
    best_params: dict[str, Any]
    best_model: PublishedModel | None  # this sweep's best trial's model (registered unless the sweep registers none)
    trials: list[TrialResult]
    steps_total: int  # training steps of this sweep's trials

    def as_record(self) -> dict[str, Any]:
        """The summary as plain JSON-ready data (``deeprnn sweep --json``)."""
        return asdict(self)


def _counts(outcomes: list[Any]) -> dict[str, int]:
    done = [o for o in outcomes if isinstance(o, StudyTrialOutcome)]
    return {
        "trials_done": len(outcomes),
        "trials_finished": sum(o.status == "FINISHED" for o in done),
        "trials_pruned": sum(o.status == "PRUNED" for o in done),
        "trials_failed": len(outcomes) - len(done),
    }


def publish_progress(spec: StudySpec, outcomes: list[Any], planned: int, progress: UUID | None = None) -> None:
    """The study so far as a Prefect markdown artifact (a new version after each trial): trials done,
    pruned, failed, and the best value so far; ``progress``, a progress artifact, to the share of trials done."""
    counts = _counts(outcomes)
    if progress is not None:
        update_progress_artifact(progress, 100.0 * len(outcomes) / max(planned, 1))
    finished = [o for o in outcomes if isinstance(o, StudyTrialOutcome) and o.status == "FINISHED"]
    best = min(finished, key=lambda o: o.value if o.value is not None else float("inf"), default=None)
    lines = [
        f"# Study {spec.name}: {counts['trials_done']} of {planned} trials done",
        "",
        f"- finished: {counts['trials_finished']}, pruned: {counts['trials_pruned']}, "
        f"failed: {counts['trials_failed']}",
        f"- best so far: trial {best.trial.index}, held-out perplexity {best.value:.3f} ({best.trial.name})"
        if best is not None and best.value is not None
        else "- best so far: none yet",
    ]
    create_markdown_artifact("\n".join(lines), key=PROGRESS_KEY, description=f"progress of study {spec.name}")


def _results(trials: list[Any], outcomes: list[Any]) -> list[TrialResult]:
    """This sweep's trials as table rows: FINISHED, PRUNED (with its step) or FAILED (with the error)."""
    out = []
    for slot, outcome in zip(trials, outcomes):
        if isinstance(outcome, StudyTrialOutcome):
            values = outcome.trial.values
            row_metrics = dict(outcome.metrics) or {"val_perplexity": outcome.value or float("nan")}
            row_metrics["steps"] = outcome.steps
            error = outcome.reason or None
            out.append(
                TrialResult(
                    outcome.trial.index, outcome.trial.name, values, outcome.status, outcome.run_id, row_metrics, error
                )
            )
        else:
            text = str(outcome).strip().splitlines()
            error = f"{type(outcome).__name__}: {text[0] if text else ''}"[:300]
            out.append(TrialResult(-1, f"slot-{slot}", {}, "FAILED", None, {}, error))
    return out


def _save_plots(study: Any, folder: Path, log: Callable[[str], None]) -> list[Path]:
    """Optuna's matplotlib pictures of the study as PNG files; one it cannot draw (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    saved = []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():  # Optuna marks these "experimental"; their pictures are what we want
                warnings.simplefilter("ignore")
                axes = getattr(vis, name)(study)
        except Exception as exc:  # e.g. importances need two finished trials and two parameters
            log(f"{name}: not drawn ({type(exc).__name__}: {exc})")
            continue
        figure = axes.get_figure() if hasattr(axes, "get_figure") else axes.flat[0].get_figure()
        path = folder / f"{name.removeprefix('plot_')}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        saved.append(path)
    return saved


def _finished(study: Any) -> int:
    """The study's finished trials (complete, pruned or failed): a trial still running elsewhere is not counted."""
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _study_best(study: Any) -> tuple[int | None, float | None, dict[str, Any]]:
    finished = [t for t in study.trials if t.value is not None and t.state.name == "COMPLETE"]
    if not finished:
        return None, None, {}
    best = min(finished, key=lambda t: t.value)
    return best.number, float(best.value), dict(best.params)


@task(name="summarize-study", cache_policy=NO_CACHE)
def summarize_study(
    spec: StudySpec,
    parent_run_id: str,
    outcomes: list[Any],
    register_best: bool = True,
    registered_model: str | None = None,
) -> StudySummary:
    """The study's best trial, value and parameters on the parent run (``study_best_value`` metric,
    ``deeprnn.study.best_*`` tags, ``study.json``), Optuna's pictures under ``study/``, the trials table,
    and this sweep's best trial's model registered. ``SweepFailedError`` when every trial failed."""
    logger = get_run_logger()
    study = spec.load()
    number, value, params = _study_best(study)
    results = _results(list(range(len(outcomes))), outcomes)
    counts = _counts(outcomes)
    steps = sum(o.steps for o in outcomes if isinstance(o, StudyTrialOutcome))
    metrics.log_metrics(parent_run_id, {**counts, "trials_steps": steps, "study_trials": _finished(study)})
    facts = {"study": spec.name, "storage": spec.shown_storage, "best_trial": number, "best_value": value}
    facts["best_params"] = params
    if number is not None and value is not None:
        metrics.log_metrics(parent_run_id, {"study_best_value": value})
        best_run = study.trials[number].user_attrs.get("mlflow_run_id", "")
        tags = {"deeprnn.study.best_trial": number, "deeprnn.study.best_run_id": best_run}
        runs.set_tags(parent_run_id, {**tags, **{f"deeprnn.study.best.{k}": v for k, v in params.items()}})
    with tempfile.TemporaryDirectory(prefix="deeprnn-study-") as folder:
        pictures = _save_plots(study, Path(folder), logger.warning)
        runs.log_texts(
            parent_run_id,
            {
                "study.json": json.dumps(facts, indent=1, default=str),
                "trials.csv": table_csv(results),
                "trials.md": table_markdown(results, runs.run_url) + "\n",
            },
        )
        for picture in pictures:
            MlflowClient().log_artifact(parent_run_id, str(picture), "study")
    finished = [o for o in outcomes if isinstance(o, StudyTrialOutcome) and o.status == "FINISHED" and o.result]
    model = None
    if finished:
        mine = min(finished, key=lambda o: o.value if o.value is not None else float("inf"))
        assert mine.result is not None
        best_row = next(r for r in results if r.index == mine.trial.index)
        metric = "val_perplexity" if mine.result.evaluation.val_perplexity is not None else "test_perplexity"
        model = roll_up_best(parent_run_id, best_row, metric, mine.result, register_best, registered_model)
    logger.info("%d finished, %d pruned, %d failed; study best: trial %s, %s", counts["trials_finished"],
                counts["trials_pruned"], counts["trials_failed"], number, value)  # fmt: skip
    if not finished and counts["trials_pruned"] == 0:
        first = next((r.error for r in results if r.error), "unknown error")
        raise SweepFailedError(f"all {len(results)} trials failed; the first error: {first}")
    return StudySummary(
        spec.name, spec.shown_storage, parent_run_id, len(outcomes), counts["trials_finished"], counts["trials_pruned"],
        counts["trials_failed"], _finished(study), number, value, params, model, results, steps,
    )  # fmt: skip
