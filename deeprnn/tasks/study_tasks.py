"""Prefect tasks of an adaptive sweep: open (or continue) the Optuna study, and run one trial of it.

A trial asks the study for its values on the worker that runs it, trains them with the whole pipeline as a
child MLflow run, reports its held-out perplexity to the study at every evaluation, and stops when the
pruner says so: its run then ends KILLED, tagged with the step and the reason, its curve kept.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.ops import cluster
from deeprnn.search.optuna_study import (
    StudyError,
    StudySpec,
    check_space,
    distributions,
    is_local_storage,
    make_pruner,
    start_study,
)
from deeprnn.search.space import Trial, make_trial, parse_space
from deeprnn.search.study_orphans import Cleanup, claim, heartbeat
from deeprnn.tasks.pipeline_tasks import run_pipeline
from deeprnn.tasks.results_tasks import RunResult
from deeprnn.tasks.step_watch import StepObserver, TrialPruned, watching
from deeprnn.tracking import runs, store
from deeprnn.training.progress import StepStats

RUN_ID_ATTR = "mlflow_run_id"  # the trial's MLflow run, on the Optuna trial


@dataclass
class StudyTrialOutcome:
    """What one trial of a study did: PRUNED (stopped at ``stopped_at_step``) or FINISHED with its result."""

    trial: Trial  # its index is the Optuna trial number
    status: str
    run_id: str | None
    value: float | None  # the objective: held-out perplexity (last measured, for a pruned trial)
    steps: int  # training steps it took
    result: RunResult | None = None
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@task(name="open-study", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def open_study(spec: StudySpec) -> int:
    """Create the study, or continue the one of the same name and search; returns how many trials it holds.
    Refuses a storage on this machine's disk when the Dask scheduler is on another machine."""
    from prefect.context import FlowRunContext

    check_space(spec.preset, spec.overrides, parse_space(spec.space))
    context = FlowRunContext.get()
    address = getattr(context.task_runner, "address", None) if context else None
    if cluster.is_remote(address) and is_local_storage(spec.storage):
        raise StudyError(
            f"the Dask scheduler {address} is on another machine but the study lives in {spec.storage}, on this "
            "machine's disk: give --storage a database every worker reaches, e.g. postgresql://user@db-host/optuna"
        )
    study, cleanup = start_study(spec, get_run_logger().warning)
    _report_cleanup(spec, study, cleanup)
    return len(study.trials)


def _report_cleanup(spec: StudySpec, study: Any, cleanup: Cleanup) -> None:
    """Log the study's trials by state, the orphaned ones just failed, and those still running elsewhere."""
    logger = get_run_logger()
    for number, reason in cleanup.failed:
        logger.warning("trial %d of study %r was left RUNNING: marked FAIL (%s)", number, spec.name, reason)
    if cleanup.left_running:
        logger.info(
            "trials %s of study %r are RUNNING: left alone (their process is alive, on another host, or not "
            "recorded%s)", cleanup.left_running, spec.name,
            f": no owner for {cleanup.no_owner}" if cleanup.no_owner else "",
        )  # fmt: skip
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    finished = states["COMPLETE"] + states["PRUNED"] + states["FAIL"]
    counts = f"{states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed"
    word = f"continuing study {spec.name!r} ({finished} finished trials: {counts})" if finished else (
        f"new study {spec.name!r}" if not states else f"study {spec.name!r} (no finished trial yet)")  # fmt: skip
    logger.info("%s in %s: sampler %s, pruner %s", word, spec.shown_storage, spec.sampler, spec.pruner)


def _objective(result: RunResult) -> float:
    """Validation perplexity when there is a validation split, else test perplexity (``selection_metric``)."""
    val = result.evaluation.val_perplexity
    return float(val if val is not None else result.evaluation.test_perplexity)


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


@task(name="run-study-trial", task_run_name="study-trial-{slot}", cache_policy=NO_CACHE)
def run_study_trial(
    spec: StudySpec, slot: int, experiment: str, runs_dir: str, parent_run_id: str, tracking_uri: str
) -> StudyTrialOutcome:
    """One trial of the study (``slot``: its place among every trial the study has had, which seeds its
    sampler): ask for values, train them as a child MLflow run, tell the study the value, or that it was
    pruned, or that it failed (then raise)."""
    import optuna
    from prefect.runtime import task_run

    store.use_tracking_uri(tracking_uri)
    logger = get_run_logger()
    study = spec.load(seed_offset=slot)
    space = parse_space(spec.space)
    with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": we beat it ourselves
        warnings.simplefilter("ignore")
        asked = study.ask(distributions(space))
    claim(asked)  # this process owns the trial: a later sweep fails it once this process is gone
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
            study.tell(asked, state=optuna.trial.TrialState.PRUNED)
            logger.info("trial %d %s", asked.number, exc)
            return StudyTrialOutcome(trial, "PRUNED", run_id, exc.value, exc.step, reason=str(exc))
        except BaseException:
            study.tell(asked, state=optuna.trial.TrialState.FAIL)
            raise
    value = _objective(result)
    asked.set_user_attr(RUN_ID_ATTR, result.run_id)
    study.tell(asked, value if math.isfinite(value) else None, state=_state(value))
    final = {k: v for k, v in result.metrics().items() if v is not None}
    steps = result.training.steps_done
    return StudyTrialOutcome(trial, "FINISHED", result.run_id, value, steps, result, metrics=final)


def _state(value: float) -> Any:
    """A diverged trial (infinite perplexity) is a failed one to Optuna: it takes no infinite values."""
    import optuna

    return optuna.trial.TrialState.COMPLETE if math.isfinite(value) else optuna.trial.TrialState.FAIL
