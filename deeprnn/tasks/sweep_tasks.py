"""Prefect tasks around a sweep's trials: check the setup, open the parent MLflow run, summarize the results.

The trials themselves are ``deeprnn.tasks.pipeline_tasks.run_trial``: the training pipeline, one child MLflow run each.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from deeprnn.ops import cluster
from deeprnn.search.ranking import TrialResult, rank, selection_metric, table_csv, table_markdown
from deeprnn.search.space import SearchSpace, Trial
from deeprnn.tasks.results_tasks import PublishedModel, RunResult, prefect_run_tags, register_version
from deeprnn.tracking import metrics, runs, store


class SweepFailedError(RuntimeError):
    """Every trial of the sweep failed."""


@dataclass(frozen=True)
class SweepSummary:
    """What a sweep returns: the trial counts, the best trial and its model, every trial ranked."""

    experiment: str
    parent_run_id: str
    trials_total: int
    trials_succeeded: int
    trials_failed: int
    selection_metric: str  # the held-out perplexity the trials are ranked by
    best: TrialResult
    best_model: PublishedModel  # with its registration, unless the sweep registers none
    trials: list[TrialResult]  # ranked, failed trials last

    def as_record(self) -> dict[str, Any]:
        """The summary as plain JSON-ready data (``deeprnn sweep --json``)."""
        return asdict(self)


@task(name="check-sweep-inputs", cache_policy=NO_CACHE)
def check_sweep_inputs() -> str:
    """Refuse a setup whose trials could not report back: an unreachable MLflow, or a tracking store on this
    machine's disk while the cluster is elsewhere. Returns the tracking URI the trials must use."""
    from prefect.context import FlowRunContext

    uri = store.check_reachable()
    context = FlowRunContext.get()
    address = getattr(context.task_runner, "address", None) if context else None
    if cluster.is_remote(address) and store.is_local_store():
        raise cluster.ClusterConfigError(
            f"the Dask scheduler {address} is on another machine but MLflow tracks to {uri}, a file here that its "
            "workers cannot reach: start an MLflow server (`mlflow server --host 0.0.0.0 --port 5000 "
            "--serve-artifacts`) and set MLFLOW_TRACKING_URI=http://<this host>:5000"
        )
    get_run_logger().info("MLflow tracking at %s; Dask scheduler %s", uri, address or "on this machine (new)")
    return store.worker_tracking_uri()


@task(name="start-sweep-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_sweep_tracking(
    trials: list[Trial], space: SearchSpace, strategy: dict[str, Any], experiment: str, planned: int | None = None
) -> str:
    """Open the sweep's parent MLflow run: the base configuration with each varied field's values, the
    search settings, and the space and trial list as ``space.json``; returns its id. An adaptive search
    passes one trial (for the base configuration) and the ``planned`` number, its trials not drawn yet."""
    from prefect.runtime import flow_run, task_run

    from deeprnn.ops.orphans import process_tags

    params: dict[str, Any] = dict(trials[0].config.flat())
    params.update(space.describe())  # varied fields: their values (or range) instead of trial 0's value
    params.update({f"sweep.{k}": v for k, v in strategy.items()})
    params["sweep.num_trials"] = len(trials) if planned is None else planned
    tags = {"deeprnn.sweep": "true", "deeprnn.preset": trials[0].config.preset, **prefect_run_tags(), **process_tags()}
    # A retry of this task finds the parent run its first attempt created; space.json is simply rewritten.
    run_id = runs.create_run(experiment, flow_run.get_name(), tags, params, opened_by=task_run.get_id())
    plan = {
        "space": space.describe(),
        "fixed": space.fixed,
        **strategy,
    }
    if planned is None:
        plan["trials"] = [{"trial": t.index, "name": t.name, "values": t.values} for t in trials]
    runs.log_texts(run_id, {"space.json": json.dumps(plan, indent=1, default=str)})
    count = len(trials) if planned is None else planned
    get_run_logger().info("sweep of %d trials, MLflow parent run %s in experiment %r", count, run_id, experiment)
    return run_id


def _error_text(outcome: BaseException) -> str:
    text = str(outcome).strip().splitlines()
    return f"{type(outcome).__name__}: {text[0] if text else ''}"[:300]


def _collect(parent_run_id: str, trials: list[Trial], outcomes: list[Any]) -> list[TrialResult]:
    """One result per trial, from what its task returned or raised and from its MLflow child run."""
    children = runs.child_runs(parent_run_id)
    latest: dict[str, runs.RunRecord] = {}
    for child in children:  # oldest first: a trial that Dask re-ran after losing a worker keeps its last run
        latest[child.tags.get("deeprnn.trial", "")] = child
        if child.status == "RUNNING":
            # Every trial has returned or raised by now; a run still open lost its worker mid-way.
            runs.mark_failed(child.run_id, "its Dask worker was lost before the trial returned")
            child.status = "FAILED"
    results = []
    for trial, outcome in zip(trials, outcomes):
        if isinstance(outcome, RunResult):
            final = {k: v for k, v in outcome.metrics().items() if v is not None}
            results.append(TrialResult(trial.index, trial.name, trial.values, "FINISHED", outcome.run_id, final))
            continue
        child = latest.get(str(trial.index))
        error = _error_text(outcome) if isinstance(outcome, BaseException) else f"no result: {outcome!r}"[:300]
        results.append(
            TrialResult(
                trial.index,
                trial.name,
                trial.values,
                "FAILED",
                child.run_id if child else None,
                dict(child.metrics) if child else {},
                error,
            )
        )
    return results


def roll_up_best(
    parent_run_id: str, best: TrialResult, metric: str, outcome: RunResult, register: bool, name: str | None
) -> PublishedModel:
    """The best trial's metrics and run on the parent run; its model registered (if ``register``) as ``name``,
    by default the name its corpus gets."""
    metrics.log_metrics(parent_run_id, {f"best_{k}": v for k, v in best.metrics.items()})
    runs.set_tags(
        parent_run_id,
        {"best_trial_run_id": outcome.run_id, "deeprnn.best_trial": best.name, "deeprnn.selection_metric": metric},
    )
    model = outcome.model
    if register and model.heldout_score is not None:
        # Once per trial run, also when this task runs again: the version is looked up by run id first.
        model = register_version(model, name or model.register_as, outcome.run_id)
    return model


@task(name="summarize-sweep", cache_policy=NO_CACHE)
def summarize_sweep(
    experiment: str,
    parent_run_id: str,
    trials: list[Trial],
    outcomes: list[Any],
    register_best: bool = True,
    registered_model: str | None = None,
) -> SweepSummary:
    """Rank the trials by held-out perplexity and roll the best up to the parent run (``best_*`` metrics,
    ``best_trial_run_id`` tag, its model registered as ``registered_model``, by default the one its corpus
    gets), with ``trials.csv``/``trials.md`` and a Prefect summary.

    ``outcomes`` holds each trial task's result, or its exception when it failed. Raises ``SweepFailedError``
    (after logging the summary) when no trial succeeded.
    """
    logger = get_run_logger()
    results = _collect(parent_run_id, trials, outcomes)
    ranked = rank(results)
    metric = selection_metric(results)
    succeeded = [r for r in results if r.succeeded]
    counts = {
        "trials_total": len(results),
        "trials_succeeded": len(succeeded),
        "trials_failed": len(results) - len(succeeded),
    }
    metrics.log_metrics(parent_run_id, counts)
    table = table_markdown(results, runs.run_url)
    runs.log_texts(parent_run_id, {"trials.csv": table_csv(results), "trials.md": table + "\n"})

    best = ranked[0] if succeeded else None
    model = None
    if best is not None:
        outcome = {t.index: o for t, o in zip(trials, outcomes)}[best.index]
        model = roll_up_best(parent_run_id, best, metric, outcome, register_best, registered_model)
    link = runs.run_url(parent_run_id)
    header = [
        f"# deeprnn sweep: {len(succeeded)} of {len(results)} trials succeeded",
        "",
        f"MLflow parent run: [{parent_run_id}]({link})" if link else f"MLflow parent run: `{parent_run_id}`",
        "",
        f"Best: **{best.name}**, {metric.replace('_', ' ')} {best.metrics.get(metric, float('nan')):.3f}"
        if best
        else "No trial succeeded.",
        "",
        f"Trials ranked by {metric.replace('_', ' ')} (failed trials last):",
        "",
    ]
    create_markdown_artifact(
        "\n".join(header) + table, key="deeprnn-sweep-summary", description="deeprnn sweep summary"
    )
    logger.info("%d of %d trials succeeded; best %s", len(succeeded), len(results), best.name if best else "none")
    for r in results:
        if not r.succeeded:
            logger.warning("%s failed: %s", r.name, r.error)
    if best is None or model is None:
        first = next((r.error for r in results if r.error), "unknown error")
        raise SweepFailedError(f"all {len(results)} trials failed; the first error: {first}")
    done = len(succeeded)
    return SweepSummary(experiment, parent_run_id, len(results), done, len(results) - done, metric, best, model, ranked)
