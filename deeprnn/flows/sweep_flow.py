"""The sweep flow: an Optuna study over a search space, one training run per trial on a Dask cluster.

check -> open or continue the study (a grid or random sweep enqueues its points not finished yet) -> open the
parent MLflow run -> submit the trials (each asks the study for its values when a worker starts it: the next
enqueued point, or TPE's draw, learning from the trials before it) -> as each ends, the progress artifacts ->
rank, roll the best up, the study's pictures on the parent run.

The search is ``grid`` (every combination, in order), ``random`` (``max_trials`` seeded draws) or ``optuna``
(TPE with a pruner: trials that fall behind stop early). The study lives in ``storage`` (an RDB URL or a journal
file, ``deeprnn.search.optuna_study``), named ``study``: running the flow again with the same name and search
continues it, a grid or random sweep with the points it has not finished, an adaptive one with ``max_trials``
more trials. Prefect keeps and shows a flow run's parameters, so a storage URL with a password is never one:
``deeprnn.ops.study_storage`` reads it from a Secret block or the environment.

The Dask cluster comes from the flow's task runner: a new local one by default, or the scheduler named by
``DEEPRNN_DASK_ADDRESS``; ``deeprnn sweep --cluster-address`` sets it per run (``deeprnn.ops.cluster``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from prefect import flow
from prefect.artifacts import create_progress_artifact
from prefect.futures import as_completed
from pydantic import Field

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
from deeprnn.ops.study_storage import NO_PASSWORD_PATTERN, study_storage
from deeprnn.search.optuna_study import STARTUP_TRIALS, StudySpec, study_spec
from deeprnn.search.space import MAX_TRIALS, parse_space
from deeprnn.tasks.sweep_report import SweepSummary, publish_progress, summarize_sweep
from deeprnn.tasks.sweep_tasks import check_sweep_inputs, open_study, run_trial, start_sweep_tracking
from deeprnn.tracking import runs
from deeprnn.training import stop_signals

SWEEP_NAME = "deeprnn-sweep"
# The form's storage field: a written-out password refused by the schema, before the run is created.
StorageField = Annotated[
    Optional[str],
    Field(json_schema_extra={"title": "Study storage", "pattern": NO_PASSWORD_PATTERN}, min_length=1, max_length=1024),
]


@flow(name=SWEEP_NAME, task_runner=task_runner_from_env(), log_prints=True)
def sweep_lm(
    space: SpaceField,
    preset: PresetField = "d2l-9.3",
    data: DataField = None,
    model: ModelField = None,
    train: TrainField = None,
    sample: SampleField = None,
    search: Annotated[Literal["grid", "random", "optuna"], form_field("Search")] = "grid",
    max_trials: Annotated[Optional[int], form_field("Trials", ge=1, le=MAX_TRIALS)] = None,
    pruner: Annotated[Literal["asha", "median", "none"], form_field("Pruner")] = "asha",
    seed: Annotated[int, form_field("Seed", ge=0, le=2**31 - 1)] = 0,
    study: Annotated[Optional[str], form_field("Study", min_length=1, max_length=256)] = None,
    storage: StorageField = None,
    experiment: ExperimentField = None,
    runs_dir: RunsDirField = "runs",
    register_best: RegisterBestField = True,
    registered_model: RegisteredModelField = None,
) -> SweepSummary:
    """A search over a space such as ``{"model.cell": ["lstm", "gru"], "train.lr": [0.5, 1, 2]}``, as an Optuna
    study: every trial trains from the preset with the sections' fields and its own values, as a child MLflow run.

    Args:
        space: Fields to search, e.g. {"model.cell": ["lstm", "gru"], "train.lr": [0.5, 1, 2]}: a list is a choice,
            {low, high, log} a range (random and optuna search).
        preset: Named configuration every trial starts from.
        data: Corpus and split settings for every trial; the fields set replace the preset's.
        model: Cell type, depth and width for every trial; the space's values replace these.
        train: Training settings for every trial; for optuna, bound trials by max_steps and evaluate with
            eval_every_steps so the pruner sees their curves.
        sample: Text generation settings; the fields set replace the preset's.
        search: grid (every combination), random (max_trials draws) or optuna (TPE, laggards pruned).
        max_trials: grid: the most trials; random: the draws; optuna: the trials this run adds. Empty: all, 10, 10.
        pruner: optuna only: asha (successive halving), median (below the median at the same step) or none.
        seed: Seed of the random draws, or of TPE.
        study: The study's name; the same name and search continues it. Empty: EXPERIMENT-SEARCH-DIGEST.
        storage: The study's RDB URL or journal file; secret:NAME: in Secret block NAME. Empty: DEEPRNN_OPTUNA_STORAGE.
        experiment: MLflow experiment of the parent and trial runs. Empty: deeprnn-sweep.
        runs_dir: Folder for checkpoints on each worker, one subfolder per trial.
        register_best: Register the best trial's model.
        registered_model: MLflow registered model the best trial's model becomes a version of. Empty: per corpus.
    """
    stop_signals.reassert()  # as the training flow: a `deeprnn` command's SIGTERM stops as its SIGINT does
    experiment = experiment or SWEEP_NAME
    sections = {"data": data, "model": model, "train": train, "sample": sample}
    spec = study_spec(
        space, preset, sections, search, max_trials, study, study_storage(storage), pruner, seed, experiment
    )
    first = spec.first_point()  # the parent run's configuration, but for the searched fields
    tracking_uri = check_sweep_inputs()
    earlier, planned = open_study(spec)
    strategy: dict[str, Any] = {"strategy": search, "sampler": spec.sampler, "pruner": spec.pruner, "seed": seed}
    strategy.update(max_trials=max_trials, study=spec.name, storage=spec.shown_storage, study_trials_before=earlier)
    strategy.update({"startup_trials": STARTUP_TRIALS} if search == "optuna" else {})
    parent_run_id = start_sweep_tracking(first, parse_space(space), strategy, experiment, planned)
    request = gpu_request(first.config.train.device, cluster_gpus())
    with runs.run_status(parent_run_id):  # the parent run ends FAILED only if no trial finished
        outcomes = _run_trials(spec, earlier, planned, request, (experiment, runs_dir, parent_run_id, tracking_uri))
        return summarize_sweep(spec, experiment, parent_run_id, outcomes, register_best, registered_model)


def _run_trials(
    spec: StudySpec, earlier: int, planned: int, request: dict[str, float] | None, run: tuple[str, str, str, str]
) -> list[Any]:
    """Submit ``planned`` trials (numbered on from the study's ``earlier`` ones) and collect each as it ends,
    its result or its exception, the progress artifacts updated after each."""
    with resources(request):  # one GPU per trial where the trials train on GPUs
        futures = [run_trial.submit(spec, earlier + i, *run) for i in range(planned)]
    outcomes: list[Any] = []
    progress = create_progress_artifact(0.0, description=f"study {spec.name}: trials done (%)")
    for future in as_completed(futures):
        try:
            outcomes.append(future.result())
        except Exception as exc:  # a failed trial is counted; the others go on
            outcomes.append(exc)
        publish_progress(spec, outcomes, planned, progress)
    return outcomes
