"""Prefect tasks of a sweep: check the setup, open (or continue) its Optuna study, open the parent MLflow run,
and run one trial (``run-trial``, on whichever Dask worker runs it). The summary is
``deeprnn.tasks.sweep_report``.

A trial asks the sweep's Optuna study for its values (a grid or random sweep's next enqueued point, or TPE's
draw), trains them with the whole pipeline as a child MLflow run, reports its held-out perplexity to the study
at every evaluation, and stops when the pruner says so: its run then ends KILLED, tagged with the step and the
reason, its curve kept. A failed trial is told to the study as FAIL, with its error, and raises.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass
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
    enqueue_points,
    is_local_storage,
    make_pruner,
    start_study,
)
from deeprnn.search.ranking import TrialResult
from deeprnn.search.space import SearchSpace, Trial, make_trial, parse_space
from deeprnn.search.study_orphans import claim, heartbeat
from deeprnn.tasks.pipeline_tasks import run_pipeline
from deeprnn.tasks.results_tasks import RunResult, open_run
from deeprnn.tasks.train_task import StepObserver, TrialPruned, watching
from deeprnn.tracking import runs, store
from deeprnn.training.progress import StepStats


def _scheduler_address() -> str | None:
    """The Dask scheduler of this flow run's task runner: None for a new local cluster."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return getattr(context.task_runner, "address", None) if context else None


@task(name="check-sweep-inputs", cache_policy=NO_CACHE)
def check_sweep_inputs() -> str:
    """Refuse a setup whose trials could not report back: an unreachable MLflow, or a tracking store on this
    machine's disk while the cluster is elsewhere. Returns the tracking URI the trials must use."""
    uri = store.check_reachable()
    address = _scheduler_address()
    if cluster.is_remote(address) and store.is_local_store():
        raise cluster.ClusterConfigError(
            f"the Dask scheduler {address} is on another machine but MLflow tracks to {uri}, a file here that its "
            "workers cannot reach: start an MLflow server (`mlflow server --host 0.0.0.0 --port 5000 "
            "--serve-artifacts`) and set MLFLOW_TRACKING_URI=http://<this host>:5000"
        )
    get_run_logger().info("MLflow tracking at %s; Dask scheduler %s", uri, address or "on this machine (new)")
    return store.worker_tracking_uri()


@task(name="open-study", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def open_study(spec: StudySpec) -> tuple[int, int]:
    """Create the study, or continue the one of the same name and search; a grid or random sweep's points not
    finished yet are enqueued. Returns how many trials the study held and how many this run takes. Refuses a
    storage on this machine's disk when the Dask scheduler is on another machine."""
    check_space(spec.preset, spec.overrides, parse_space(spec.space))
    address = _scheduler_address()
    if cluster.is_remote(address) and is_local_storage(spec.storage):
        raise StudyError(
            f"the Dask scheduler {address} is on another machine but the study lives in {spec.storage}, on this "
            "machine's disk: give --storage a database every worker reaches, e.g. postgresql://user@db-host/optuna"
        )
    logger = get_run_logger()
    study, cleanup = start_study(spec, logger.warning)
    # The study's trials by state, the orphaned ones just failed, and those still running elsewhere.
    for number, reason in cleanup.failed:
        logger.warning("trial %d of study %r was left RUNNING: marked FAIL (%s)", number, spec.name, reason)
    if cleanup.left_running:
        logger.info(
            "trials %s of study %r are RUNNING: left alone (their process is alive, on another host, or not "
            "recorded%s)",
            cleanup.left_running,
            spec.name,
            f": no owner for {cleanup.no_owner}" if cleanup.no_owner else "",
        )
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    finished = states["COMPLETE"] + states["PRUNED"] + states["FAIL"]
    counts = f"{states['COMPLETE']} complete, {states['PRUNED']} pruned, {states['FAIL']} failed"
    word = f"study {spec.name!r} (no finished trial yet)" if states else f"new study {spec.name!r}"
    if finished:
        word = f"continuing study {spec.name!r} ({finished} finished trials: {counts})"
    logger.info("%s in %s: sampler %s, pruner %s", word, spec.shown_storage, spec.sampler, spec.pruner)
    return len(study.trials), enqueue_points(study, spec)  # the trials it held before the points are enqueued


@task(name="start-sweep-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_sweep_tracking(
    first: Trial, space: SearchSpace, strategy: dict[str, Any], experiment: str, planned: int
) -> str:
    """Open the sweep's parent MLflow run: the base configuration (``first``'s, but for the searched fields)
    with each varied field's values, the search settings, ``planned`` trials, and the space as ``space.json``;
    returns its id."""
    # Varied fields: their values (or range) instead of the first point's value.
    params = first.config.flat() | space.describe() | {f"sweep.{k}": v for k, v in strategy.items()}
    params["sweep.num_trials"] = planned
    # A retry of this task finds the parent run its first attempt created; space.json is simply rewritten.
    run_id = open_run(experiment, {"deeprnn.sweep": "true", "deeprnn.preset": first.config.preset}, params)
    plan = {"space": space.describe(), "fixed": space.fixed, **strategy}
    runs.log_texts(run_id, {"space.json": json.dumps(plan, indent=1, default=str)})
    get_run_logger().info("sweep of %d trials, MLflow parent run %s in experiment %r", planned, run_id, experiment)
    return run_id


RUN_ID_ATTR = "mlflow_run_id"  # the trial's MLflow run, on the Optuna trial
PARENT_ATTR = "deeprnn.parent_run_id"  # the sweep (its parent MLflow run) that ran the trial
ERROR_ATTR = "deeprnn.error"  # why a trial failed


@dataclass
class TrialOutcome:
    """What one trial did: its row in the sweep's tables, PRUNED (why, in its error) or FINISHED with its result."""

    row: TrialResult  # its index is the Optuna trial number; its metrics include the training steps it took
    value: float  # the objective: held-out perplexity (last measured, for a pruned trial)
    result: RunResult | None = None


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: a failed trial's error in tables."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _reporter(trial: Any) -> StepObserver:
    """The ``on_step`` observer of one trial: each held-out measurement to Optuna, ``TrialPruned`` when the
    pruner stops the trial there."""

    def report(stats: StepStats) -> None:
        value = stats.heldout_perplexity
        if value is not None:
            trial.report(value, stats.step)
            if trial.should_prune():
                raise TrialPruned(stats.step, value, f"{trial.study.pruner.__class__.__name__} stopped it")

    return report


def _end_pruned(parent_run_id: str, asked: Any, exc: TrialPruned) -> str | None:
    """The pruned trial's run ends KILLED with why and where (the pipeline ended it FAILED), and is the Optuna
    trial's run; returns its id."""
    number = str(asked.number)
    child = next((c for c in reversed(runs.child_runs(parent_run_id)) if c.tags.get("deeprnn.trial") == number), None)
    if child is None:
        return None
    stopped = {"deeprnn.stopped_at_step": exc.step, "deeprnn.pruned_at_step": exc.step}
    runs.set_tags(child.run_id, {"deeprnn.stop_reason": "pruned", "deeprnn.stop_detail": str(exc), **stopped})
    MlflowClient().set_terminated(child.run_id, RunStatus.to_string(RunStatus.KILLED))
    asked.set_user_attr(RUN_ID_ATTR, child.run_id)
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
    with warnings.catch_warnings(action="ignore"):  # "heartbeat is meant for Study.optimize": we beat it ourselves
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
            run_id = _end_pruned(parent_run_id, asked, exc)
            study.tell(asked, state=TrialState.PRUNED)
            get_run_logger().info("trial %d %s", asked.number, exc)
            measured = {"val_perplexity": exc.value, "steps": exc.step}
            row = TrialResult(trial.index, trial.name, trial.values, "PRUNED", run_id, measured, str(exc))
            return TrialOutcome(row, exc.value)
        except BaseException as exc:
            if isinstance(exc, Exception):
                asked.set_user_attr(ERROR_ATTR, error_text(exc))
            study.tell(asked, state=TrialState.FAIL)
            raise
    value = result.model.heldout_score  # the objective: validation perplexity, else test perplexity
    asked.set_user_attr(RUN_ID_ATTR, result.run_id)
    finite = math.isfinite(value)
    # A diverged trial (infinite perplexity) is a failed one to Optuna: it takes no infinite values.
    study.tell(asked, value if finite else None, state=TrialState.COMPLETE if finite else TrialState.FAIL)
    measured = {k: v for k, v in result.metrics().items() if v is not None} | {"steps": result.training.steps_done}
    row = TrialResult(trial.index, trial.name, trial.values, "FINISHED", result.run_id, measured)
    return TrialOutcome(row, value, result)
