"""The adaptive sweep flow: an Optuna study (TPE sampler, a pruner) over the sweep's search space, one
training run per trial on a Dask cluster, trials that fall behind stopped early.

check -> open or continue the study -> open the parent MLflow run -> submit ``max_trials`` trials (each asks
the study for its values when a worker starts it, so later trials learn from earlier ones) -> as each ends,
the study's progress artifact -> the best trial rolled up, the study's pictures on the parent run.

The study lives in ``storage`` (an RDB URL or a journal file, ``deeprnn.search.optuna_study``), named ``study``: running
the flow again with the same name and search continues it with ``max_trials`` more trials.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional

from prefect import flow
from prefect.artifacts import create_progress_artifact
from prefect.futures import as_completed

from deeprnn.config import (
    REGISTERED_MODEL_PATTERN,
    DataConfig,
    ModelConfig,
    PresetName,
    SampleConfig,
    TrainConfig,
    section_values,
)
from deeprnn.flows.parameters import form_field
from deeprnn.ops.cluster import cluster_gpus, gpu_request, resources, task_runner_from_env
from deeprnn.search.optuna_study import DEFAULT_STORAGE, STARTUP_TRIALS, StudySpec, check_names, check_space
from deeprnn.search.space import MAX_TRIALS, parse_space
from deeprnn.tasks.study_report import StudySummary, publish_progress, summarize_study
from deeprnn.tasks.study_tasks import open_study, run_study_trial
from deeprnn.tasks.sweep_tasks import check_sweep_inputs, start_sweep_tracking
from deeprnn.tracking import runs

STUDY_FLOW_NAME = "deeprnn-adaptive-sweep"


def study_spec(
    space: dict[str, Any],
    preset: str,
    sections: dict[str, Any],
    study: Optional[str],
    storage: Optional[str],
    sampler: str,
    pruner: str,
    seed: int,
) -> StudySpec:
    """The study to run, every input checked (names, space, its ends as configurations), nothing opened yet."""
    check_names(sampler, pruner)
    search_space = parse_space(space)
    check_space(preset, sections, search_space)
    overrides = {k: section_values(v) for k, v in sections.items() if section_values(v)}
    name = study or STUDY_FLOW_NAME
    # As for the CLI's --storage: the environment of the process that runs the flow names the default.
    storage = storage or os.environ.get("DEEPRNN_OPTUNA_STORAGE") or DEFAULT_STORAGE
    return StudySpec(name, storage, space, preset, overrides, sampler, pruner, seed)


@flow(name=STUDY_FLOW_NAME, task_runner=task_runner_from_env(), log_prints=True)
def sweep_study(
    space: Annotated[dict[str, Any], form_field("Search space")],
    preset: Annotated[PresetName, form_field("Preset")] = "d2l-9.3",
    data: Annotated[Optional[DataConfig], form_field("Data")] = None,
    model: Annotated[Optional[ModelConfig], form_field("Model")] = None,
    train: Annotated[Optional[TrainConfig], form_field("Training")] = None,
    sample: Annotated[Optional[SampleConfig], form_field("Samples")] = None,
    max_trials: Annotated[int, form_field("Trials", ge=1, le=MAX_TRIALS)] = 10,
    pruner: Annotated[Literal["asha", "median", "none"], form_field("Pruner")] = "asha",
    sampler: Annotated[Literal["tpe"], form_field("Sampler")] = "tpe",
    seed: Annotated[int, form_field("Seed", ge=0, le=2**31 - 1)] = 0,
    study: Annotated[Optional[str], form_field("Study", min_length=1, max_length=256)] = None,
    storage: Annotated[Optional[str], form_field("Study storage", min_length=1, max_length=1024)] = None,
    experiment: Annotated[Optional[str], form_field("MLflow experiment", min_length=1, max_length=256)] = None,
    runs_dir: Annotated[str, form_field("Checkpoint folder", min_length=1, max_length=1024)] = "runs",
    register_best: Annotated[bool, form_field("Register the best model")] = True,
    registered_model: Annotated[Optional[str], form_field("Registered model", pattern=REGISTERED_MODEL_PATTERN)] = None,
) -> StudySummary:
    """Adaptive search (Optuna): ``max_trials`` more trials of a study, trials that fall behind stopped early.

    Each trial reports its held-out perplexity at every evaluation; the pruner stops those that fall behind
    (their MLflow runs end KILLED, tagged with the step). The best trial's model is registered as in a sweep.

    Args:
        space: Configuration fields to search, e.g. {"train.lr": {"low": 0.1, "high": 4, "log": true},
            "model.cell": ["lstm", "gru"]}: a list is a choice, {low, high, log} a range.
        preset: Named configuration every trial starts from.
        data: Corpus and split settings for every trial; the fields set replace the preset's.
        model: Cell type, depth and width for every trial; the space's values replace these.
        train: Training settings for every trial; bound trials by max_steps and evaluate with eval_every_steps
            so the pruner sees their curves.
        sample: Text generation settings; the fields set replace the preset's.
        max_trials: Trials this run adds to the study.
        pruner: asha (asynchronous successive halving), median (below the median at the same step) or none.
        sampler: The Optuna sampler (TPE, seeded).
        seed: Seed of the sampler.
        study: The study's name; the same name and search continues it. Empty: deeprnn-adaptive-sweep.
        storage: Where the study lives: an RDB URL (sqlite:///studies.db; postgresql://... for several machines)
            or a journal file. Empty: DEEPRNN_OPTUNA_STORAGE, else optuna.journal in the working directory.
        experiment: MLflow experiment of the parent and trial runs. Empty: deeprnn-adaptive-sweep.
        runs_dir: Folder for checkpoints on each worker, one subfolder per trial.
        register_best: Register this run's best trial's model.
        registered_model: MLflow registered model the best trial's model becomes a version of. Empty: per corpus.
    """
    sections = {"data": data, "model": model, "train": train, "sample": sample}
    spec = study_spec(space, preset, sections, study, storage, sampler, pruner, seed)
    search_space = parse_space(space)
    first = spec.first_point()  # the parent run's configuration, but for the searched fields
    tracking_uri = check_sweep_inputs()
    earlier = open_study(spec)
    experiment = experiment or STUDY_FLOW_NAME
    strategy = {"strategy": "optuna", "sampler": sampler, "pruner": pruner, "max_trials": max_trials, "seed": seed}
    strategy.update(study=spec.name, storage=spec.storage, startup_trials=STARTUP_TRIALS, study_trials_before=earlier)
    parent_run_id = start_sweep_tracking([first], search_space, strategy, experiment, planned=max_trials)
    request = gpu_request(first.config.train.device, cluster_gpus())
    with runs.run_status(parent_run_id):
        run = (experiment, runs_dir, parent_run_id, tracking_uri)
        outcomes = _run_trials(spec, earlier, max_trials, request, run)
        summary = summarize_study(spec, parent_run_id, outcomes, register_best, registered_model)
    return summary


def _run_trials(
    spec: StudySpec, earlier: int, max_trials: int, request: dict[str, float] | None, run: tuple[str, str, str, str]
) -> list[Any]:
    """Submit ``max_trials`` trials (numbered on from the study's ``earlier`` ones) and collect each as it ends,
    its result or its exception, the progress artifacts updated after each."""
    futures = []
    for i in range(max_trials):
        with resources(request):  # one GPU per trial where the trials train on GPUs
            futures.append(run_study_trial.submit(spec, earlier + i, *run))
    outcomes: list[Any] = []
    progress = create_progress_artifact(0.0, description=f"study {spec.name}: trials done (%)")
    for future in as_completed(futures):
        try:
            outcomes.append(future.result())
        except Exception as exc:  # a failed trial is counted; the others go on
            outcomes.append(exc)
        publish_progress(spec, outcomes, max_trials, progress)
    return outcomes
