"""Prefect tasks that open a sweep: check the setup, open (or continue) its Optuna study, open the parent
MLflow run. The trials are ``deeprnn.tasks.trial_task.run_trial``; the summary is ``deeprnn.tasks.sweep_report``.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.ops import cluster
from deeprnn.search.optuna_study import (
    StudyError,
    StudySpec,
    check_space,
    enqueue_points,
    is_local_storage,
    start_study,
)
from deeprnn.search.space import SearchSpace, Trial, parse_space
from deeprnn.search.study_orphans import Cleanup
from deeprnn.tasks.results_tasks import open_run
from deeprnn.tracking import runs, store


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
    study, cleanup = start_study(spec, get_run_logger().warning)
    _report_cleanup(spec, study, cleanup)
    earlier = len(study.trials)
    return earlier, enqueue_points(study, spec)


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


@task(name="start-sweep-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_sweep_tracking(
    first: Trial, space: SearchSpace, strategy: dict[str, Any], experiment: str, planned: int
) -> str:
    """Open the sweep's parent MLflow run: the base configuration (``first``'s, but for the searched fields)
    with each varied field's values, the search settings, ``planned`` trials, and the space as ``space.json``;
    returns its id."""
    params: dict[str, Any] = dict(first.config.flat())
    params.update(space.describe())  # varied fields: their values (or range) instead of the first point's value
    params.update({f"sweep.{k}": v for k, v in strategy.items()})
    params["sweep.num_trials"] = planned
    # A retry of this task finds the parent run its first attempt created; space.json is simply rewritten.
    run_id = open_run(experiment, {"deeprnn.sweep": "true", "deeprnn.preset": first.config.preset}, params)
    plan = {"space": space.describe(), "fixed": space.fixed, **strategy}
    runs.log_texts(run_id, {"space.json": json.dumps(plan, indent=1, default=str)})
    get_run_logger().info("sweep of %d trials, MLflow parent run %s in experiment %r", planned, run_id, experiment)
    return run_id
