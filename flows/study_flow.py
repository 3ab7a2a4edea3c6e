"""The adaptive sweep flow: an Optuna study (TPE sampler, a pruner) over the sweep's search space, one
training run per trial on a Dask cluster, trials that fall behind stopped early.

check -> open or continue the study -> open the parent MLflow run -> submit ``max_trials`` trials (each asks
the study for its values when a worker starts it, so later trials learn from earlier ones) -> as each ends,
the study's progress artifact -> the best trial rolled up, the study's pictures on the parent run.

The study lives in ``storage`` (an RDB URL or a journal file, ``deeprnn.study``), named ``study``: running
the flow again with the same name and search continues it with ``max_trials`` more trials.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from prefect import flow
from prefect.futures import as_completed

from deeprnn.config import DataConfig, section_values, ModelConfig, PresetName, SampleConfig, TrainConfig
from deeprnn.search import make_trial, parse_space
from deeprnn.study import DEFAULT_STORAGE, STARTUP_TRIALS, StudySpec, check_names, check_space, corner_values
from ops.cluster import cluster_gpus, gpu_request, resources, task_runner_from_env
from tasks.study import open_study, run_study_trial
from tasks.study_report import StudySummary, publish_progress, summarize_study
from tasks.sweep import check_sweep_inputs, start_sweep_tracking
from tracking import runs

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
    return StudySpec(name, storage or DEFAULT_STORAGE, space, preset, overrides, sampler, pruner, seed)


@flow(name=STUDY_FLOW_NAME, task_runner=task_runner_from_env(), log_prints=True)
def sweep_study(
    space: dict[str, Any],
    preset: PresetName = "d2l-9.3",
    data: Optional[DataConfig] = None,
    model: Optional[ModelConfig] = None,
    train: Optional[TrainConfig] = None,
    sample: Optional[SampleConfig] = None,
    max_trials: int = 10,
    pruner: Literal["asha", "median", "none"] = "asha",
    sampler: Literal["tpe"] = "tpe",
    seed: int = 0,
    study: Optional[str] = None,
    storage: Optional[str] = None,
    experiment: Optional[str] = None,
    runs_dir: str = "runs",
    register_best: bool = True,
    registered_model: Optional[str] = None,
) -> StudySummary:
    """Adaptive search over a space such as ``{"train.lr": {"low": 0.1, "high": 4, "log": true}, "model.cell":
    ["lstm", "gru"]}``: ``max_trials`` more trials of the study ``study`` (default: the flow's name) in
    ``storage`` (default: the journal file ``optuna.journal`` here), each reporting its held-out perplexity at
    every evaluation; ``pruner`` stops those that fall behind. The best trial's model is registered as in
    ``sweep_lm``."""
    sections = {"data": data, "model": model, "train": train, "sample": sample}
    spec = study_spec(space, preset, sections, study, storage, sampler, pruner, seed)
    search_space = parse_space(space)
    first = make_trial(preset, spec.overrides, search_space, 0, corner_values(search_space)[0])
    tracking_uri = check_sweep_inputs()
    earlier = open_study(spec)
    experiment = experiment or STUDY_FLOW_NAME
    strategy = {"strategy": "optuna", "sampler": sampler, "pruner": pruner, "max_trials": max_trials, "seed": seed}
    strategy.update(study=spec.name, storage=spec.storage, startup_trials=STARTUP_TRIALS, study_trials_before=earlier)
    parent_run_id = start_sweep_tracking([first], search_space, strategy, experiment, planned=max_trials)
    request = gpu_request(first.config.train.device, cluster_gpus())
    with runs.run_status(parent_run_id):
        futures = []
        for i in range(max_trials):
            with resources(request):  # one GPU per trial where the trials train on GPUs
                futures.append(
                    run_study_trial.submit(spec, earlier + i, experiment, runs_dir, parent_run_id, tracking_uri)
                )
        outcomes: list[Any] = []
        for future in as_completed(futures):
            try:
                outcomes.append(future.result())
            except Exception as exc:  # a failed trial is counted; the others go on
                outcomes.append(exc)
            publish_progress(spec, outcomes, max_trials)
        summary = summarize_study(spec, parent_run_id, outcomes, register_best, registered_model)
    return summary
