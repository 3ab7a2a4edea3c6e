"""The sweep flow: one training run per point of a search space, run side by side on a Dask cluster.

check -> plan the trials -> open the parent MLflow run -> submit every trial (the training pipeline, one
child run each) to the cluster -> wait for all, failed ones included -> rank and roll the best up.

The Dask cluster comes from the flow's task runner: a new local one by default, or the scheduler named by
``DEEPRNN_DASK_ADDRESS``; ``deeprnn sweep --cluster-address`` sets it per run (``deeprnn.ops.cluster``).
"""

from __future__ import annotations

from typing import Annotated, Optional

from prefect import allow_failure, flow

from deeprnn.flows.parameters import (
    DataField,
    ExperimentField,
    ModelField,
    PresetField,
    RegisterBestField,
    RegisteredModelField,
    RunsDirField,
    SampleField,
    SpaceField,
    TrainField,
    form_field,
)
from deeprnn.ops.cluster import cluster_gpus, gpu_request, resources, task_runner_from_env
from deeprnn.search.space import parse_space, plan_trials
from deeprnn.tasks.pipeline_tasks import run_trial
from deeprnn.tasks.sweep_tasks import SweepSummary, check_sweep_inputs, start_sweep_tracking, summarize_sweep
from deeprnn.tracking import runs
from deeprnn.training import stop_signals

SWEEP_NAME = "deeprnn-sweep"


@flow(name=SWEEP_NAME, task_runner=task_runner_from_env(), log_prints=True)
def sweep_lm(
    space: SpaceField,
    preset: PresetField = "d2l-9.3",
    data: DataField = None,
    model: ModelField = None,
    train: TrainField = None,
    sample: SampleField = None,
    random_search: Annotated[bool, form_field("Random search")] = False,
    max_trials: Annotated[Optional[int], form_field("Trials", ge=1)] = None,
    seed: Annotated[int, form_field("Seed")] = 0,
    experiment: ExperimentField = None,
    runs_dir: RunsDirField = "runs",
    register_best: RegisterBestField = True,
    registered_model: RegisteredModelField = None,
) -> SweepSummary:
    """Grid or random search over a space such as ``{"model.cell": ["lstm", "gru"], "train.lr": [0.5, 1, 2]}``:
    every trial trains from the preset with the sections' fields (see ``deeprnn.flows.parameters``) and its own
    values, as a child MLflow run.

    Args:
        space: Configuration fields to search, e.g. {"model.cell": ["lstm", "gru"], "train.lr": [0.5, 1, 2]}:
            a list is a choice, {low, high, log} a range (random search only).
        preset: Named configuration every trial starts from.
        data: Corpus and split settings for every trial; the fields set replace the preset's.
        model: Cell type, depth and width for every trial; the space's values replace these.
        train: Training settings for every trial; the space's values replace these.
        sample: Text generation settings; the fields set replace the preset's.
        random_search: Draw max_trials points of the space at random instead of taking the whole grid.
        max_trials: Most trials (a larger grid is refused), or the random draws. Empty: the grid, or 10 draws.
        seed: Seed of the random draws.
        experiment: MLflow experiment of the parent and trial runs. Empty: deeprnn-sweep.
        runs_dir: Folder for checkpoints on each worker, one subfolder per trial.
        register_best: Register the best trial's model.
        registered_model: MLflow registered model the best trial's model becomes a version of. Empty: per corpus.
    """
    stop_signals.reassert()  # as the training flow: a `deeprnn` command's SIGTERM stops as its SIGINT does
    search_space = parse_space(space)
    trials = plan_trials(
        preset,
        {"data": data, "model": model, "train": train, "sample": sample},
        search_space,
        random_search,
        max_trials,
        seed,
    )
    strategy = {"strategy": "random" if random_search else "grid", "max_trials": max_trials, "seed": seed}
    tracking_uri = check_sweep_inputs()
    gpus = cluster_gpus()
    requests = [gpu_request(trial.config.train.device, gpus) for trial in trials]
    parent_run_id = start_sweep_tracking(trials, search_space, strategy, experiment or SWEEP_NAME)
    with runs.run_status(parent_run_id):  # the parent run ends FAILED only if no trial succeeded
        futures = []
        for trial, request in zip(trials, requests):
            with resources(request):  # one GPU per trial where the trials train on GPUs
                futures.append(run_trial.submit(trial, experiment or SWEEP_NAME, runs_dir, parent_run_id, tracking_uri))
        outcomes = [allow_failure(f) for f in futures]
        summary = summarize_sweep(
            experiment or SWEEP_NAME, parent_run_id, trials, outcomes, register_best, registered_model
        )
    return summary
