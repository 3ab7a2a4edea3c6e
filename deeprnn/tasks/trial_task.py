"""The Prefect task of one sweep trial, on whichever Dask worker runs it.

A trial asks the sweep's Optuna study for its values (a grid or random sweep's next enqueued point, or TPE's
draw), trains them with the whole pipeline as a child MLflow run, reports its held-out perplexity to the study
at every evaluation, and stops when the pruner says so: its run then ends KILLED, tagged with the step and the
reason, its curve kept. A failed trial is told to the study as FAIL, with its error, and raises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.search.optuna_study import StudySpec, distributions, make_pruner
from deeprnn.search.space import Trial, make_trial, parse_space
from deeprnn.search.study_orphans import claim, heartbeat
from deeprnn.tasks.pipeline_tasks import run_pipeline
from deeprnn.tasks.results_tasks import RunResult
from deeprnn.tasks.step_watch import StepObserver, TrialPruned, watching
from deeprnn.tracking import runs, store
from deeprnn.training.progress import StepStats

RUN_ID_ATTR = "mlflow_run_id"  # the trial's MLflow run, on the Optuna trial
PARENT_ATTR = "deeprnn.parent_run_id"  # the sweep (its parent MLflow run) that ran the trial
ERROR_ATTR = "deeprnn.error"  # why a trial failed


@dataclass
class TrialOutcome:
    """What one trial did: PRUNED (stopped at ``steps``) or FINISHED with its result."""

    trial: Trial  # its index is the Optuna trial number
    status: str
    run_id: str | None
    value: float | None  # the objective: held-out perplexity (last measured, for a pruned trial)
    steps: int  # training steps it took
    result: RunResult | None = None
    reason: str = ""


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: a failed trial's error in tables."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _reporter(trial: Any) -> StepObserver:
    """The ``on_step`` observer of one trial: each held-out measurement to Optuna, ``TrialPruned`` when the
    pruner stops the trial there."""

    def report(stats: StepStats) -> None:
        value = stats.heldout_perplexity
        if value is None:
            return
        trial.report(value, stats.step)
        if trial.should_prune():
            raise TrialPruned(stats.step, value, f"{trial.study.pruner.__class__.__name__} stopped it")

    return report


def _end_pruned(parent_run_id: str, number: int, exc: TrialPruned) -> str | None:
    """The pruned trial's run ends KILLED with why and where (the pipeline ended it FAILED); returns its id."""
    child = next(
        (c for c in reversed(runs.child_runs(parent_run_id)) if c.tags.get("deeprnn.trial") == str(number)), None
    )
    if child is None:
        return None
    runs.set_tags(
        child.run_id,
        {
            "deeprnn.stop_reason": "pruned",
            "deeprnn.stop_detail": str(exc),
            "deeprnn.stopped_at_step": exc.step,
            "deeprnn.pruned_at_step": exc.step,
        },
    )
    MlflowClient().set_terminated(child.run_id, RunStatus.to_string(RunStatus.KILLED))
    return child.run_id


@task(name="run-trial", task_run_name="trial-{slot}", cache_policy=NO_CACHE)
def run_trial(
    spec: StudySpec, slot: int, experiment: str, runs_dir: str, parent_run_id: str, tracking_uri: str
) -> TrialOutcome:
    """One trial of the sweep's study (``slot``: its place among every trial the study has had, which seeds
    its sampler): ask for values, train them as a child MLflow run, tell the study the value, or that it was
    pruned, or that it failed (then raise)."""
    from optuna.trial import TrialState
    from prefect.runtime import task_run

    store.use_tracking_uri(tracking_uri)  # the sweep's store, whatever this worker's environment says
    study = spec.load(seed_offset=slot)
    space = parse_space(spec.space)
    with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": we beat it ourselves
        warnings.simplefilter("ignore")
        asked = study.ask(distributions(space))
    claim(asked)  # this process owns the trial: a later sweep fails it once this process is gone
    asked.set_user_attr(PARENT_ATTR, parent_run_id)
    values = {key: asked.params[key] for key in space.dims}
    tags = {"deeprnn.trial": str(asked.number), "prefect.task_run_id": str(task_run.get_id() or "")}
    tags["deeprnn.search.optuna_study"] = spec.name
    with heartbeat(asked):
        try:
            trial = make_trial(spec.preset, spec.overrides, space, asked.number, values)
            # The pruner's rungs follow this trial's step budget (the space may vary it).
            study.pruner = make_pruner(spec.pruner, trial.config.train.max_steps)
            with watching(_reporter(asked)):
                result = run_pipeline(
                    trial.config, experiment, runs_dir, parent_run_id, trial.name, tags, register_model=False
                )
        except TrialPruned as exc:
            run_id = _end_pruned(parent_run_id, asked.number, exc)
            if run_id:
                asked.set_user_attr(RUN_ID_ATTR, run_id)
            study.tell(asked, state=TrialState.PRUNED)
            get_run_logger().info("trial %d %s", asked.number, exc)
            return TrialOutcome(trial, "PRUNED", run_id, exc.value, exc.step, reason=str(exc))
        except BaseException as exc:
            if isinstance(exc, Exception):
                asked.set_user_attr(ERROR_ATTR, error_text(exc))
            study.tell(asked, state=TrialState.FAIL)
            raise
    # The objective: validation perplexity when there is a validation split, else test perplexity.
    value = float(result.evaluation.val_perplexity or result.evaluation.test_perplexity)
    asked.set_user_attr(RUN_ID_ATTR, result.run_id)
    finite = math.isfinite(value)
    # A diverged trial (infinite perplexity) is a failed one to Optuna: it takes no infinite values.
    study.tell(asked, value if finite else None, state=TrialState.COMPLETE if finite else TrialState.FAIL)
    return TrialOutcome(trial, "FINISHED", result.run_id, value, result.training.steps_done, result)
