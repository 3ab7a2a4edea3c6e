"""The adaptive sweep flow: an Optuna study (TPE sampler, a pruner) over the sweep's search space, one
training run per trial on a Dask cluster, trials that fall behind stopped early.

check -> open or continue the study -> open the parent MLflow run -> submit ``max_trials`` trials (each asks
the study for its values when a worker starts it, so later trials learn from earlier ones) -> as each ends,
the study's progress artifact -> the best trial rolled up, the study's pictures on the parent run.

The study lives in ``storage`` (an RDB URL or a journal file, ``deeprnn.search.optuna_study``), named ``study``: running
the flow again with the same name and search continues it with ``max_trials`` more trials. Prefect keeps and shows
a flow run's parameters, so a storage URL with a password is never one: ``study_storage`` reads it from a Secret
block or the environment.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Optional

from prefect import flow
from prefect.artifacts import create_progress_artifact
from prefect.futures import as_completed
from pydantic import Field

from deeprnn.config import section_values
from deeprnn.data.urls import has_password, is_masked, mask_password
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
from deeprnn.search.optuna_study import (
    DEFAULT_STORAGE,
    STARTUP_TRIALS,
    StudyError,
    StudySpec,
    check_names,
    check_space,
)
from deeprnn.search.space import MAX_TRIALS, parse_space
from deeprnn.tasks.study_report import StudySummary, publish_progress, summarize_study
from deeprnn.tasks.study_tasks import open_study, run_study_trial
from deeprnn.tasks.sweep_tasks import check_sweep_inputs, start_sweep_tracking
from deeprnn.tracking import runs

STUDY_FLOW_NAME = "deeprnn-adaptive-sweep"
STORAGE_ENV = "DEEPRNN_OPTUNA_STORAGE"
SECRET_PREFIX = "secret:"  # a storage parameter "secret:NAME" names the Prefect Secret block holding the URL
# The form refuses a URL whose password is written out (scheme://user:password@...) before the run is created;
# "***", a masked password, passes: the URL then comes from the environment. In the schema only, so that the
# flow's own check (``study_storage``) says why in one line, without echoing the value.
NO_PASSWORD_PATTERN = r"^(?![A-Za-z][A-Za-z0-9+.\-]*://[^/@:?#]*:(?!\*\*\*@)[^@?#]*@)"
# The form's storage field: the pattern above, in the schema only.
StorageField = Annotated[
    Optional[str],
    Field(json_schema_extra={"title": "Study storage", "pattern": NO_PASSWORD_PATTERN}, min_length=1, max_length=1024),
]
PASSWORD_REFUSED = (
    "the study storage holds a password, and Prefect keeps and shows a flow run's parameters: put the URL in a "
    f"Prefect Secret block and give storage {SECRET_PREFIX}BLOCK-NAME, or set {STORAGE_ENV} in the worker's "
    "environment and leave storage empty"
)


def study_storage(storage: Optional[str]) -> str:
    """The study's storage URL from the flow's ``storage`` parameter. Empty: ``DEEPRNN_OPTUNA_STORAGE`` of the
    process that runs the flow, else ``optuna.journal``; ``secret:NAME``: the value of Prefect Secret block
    NAME; a URL with its password masked (``user:***@``): ``DEEPRNN_OPTUNA_STORAGE`` when it holds that URL;
    any other value as given. ``StudyError`` for a URL whose password is written out, a missing block, or a
    masked URL the environment does not hold."""
    if not storage:
        return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if storage.startswith(SECRET_PREFIX):
        return _secret_storage(storage.removeprefix(SECRET_PREFIX).strip())
    if is_masked(storage):
        real = os.environ.get(STORAGE_ENV, "")
        if not real or mask_password(real) != storage:
            raise StudyError(
                f"the study storage {storage} has its password masked, and {STORAGE_ENV} in this process's "
                "environment does not hold that URL: set it there, or give the storage as secret:BLOCK-NAME"
            )
        return real
    if has_password(storage):
        raise StudyError(PASSWORD_REFUSED)
    return storage


def _secret_storage(name: str) -> str:
    """The storage URL held by Prefect Secret block ``name``; ``StudyError`` naming it when there is none."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name, validate=False).get()
    except (ValueError, LookupError) as exc:  # Prefect: "Unable to find block document named ..."
        raise StudyError(
            f"no Prefect Secret block {name!r} holding the study storage ({type(exc).__name__}): create it in "
            "the dashboard's Blocks page, or with Secret(value=URL).save(NAME)"
        ) from None
    if not isinstance(value, str) or not value:
        raise StudyError(f"Prefect Secret block {name!r} does not hold a storage URL (a non-empty string)")
    return value


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
    storage = storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    return StudySpec(name, storage, space, preset, overrides, sampler, pruner, seed)


@flow(name=STUDY_FLOW_NAME, task_runner=task_runner_from_env(), log_prints=True)
def sweep_study(
    space: SpaceField,
    preset: PresetField = "d2l-9.3",
    data: DataField = None,
    model: ModelField = None,
    train: TrainField = None,
    sample: SampleField = None,
    max_trials: Annotated[int, form_field("Trials", ge=1, le=MAX_TRIALS)] = 10,
    pruner: Annotated[Literal["asha", "median", "none"], form_field("Pruner")] = "asha",
    sampler: Annotated[Literal["tpe"], form_field("Sampler")] = "tpe",
    seed: Annotated[int, form_field("Seed", ge=0, le=2**31 - 1)] = 0,
    study: Annotated[Optional[str], form_field("Study", min_length=1, max_length=256)] = None,
    storage: StorageField = None,
    experiment: ExperimentField = None,
    runs_dir: RunsDirField = "runs",
    register_best: RegisterBestField = True,
    registered_model: RegisteredModelField = None,
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
        storage: Where the study lives: an RDB URL (sqlite:///studies.db, postgresql://...) or a journal file; a URL
            with a password as secret:NAME, the Secret block NAME holding it. Empty: DEEPRNN_OPTUNA_STORAGE.
        experiment: MLflow experiment of the parent and trial runs. Empty: deeprnn-adaptive-sweep.
        runs_dir: Folder for checkpoints on each worker, one subfolder per trial.
        register_best: Register this run's best trial's model.
        registered_model: MLflow registered model the best trial's model becomes a version of. Empty: per corpus.
    """
    sections = {"data": data, "model": model, "train": train, "sample": sample}
    spec = study_spec(space, preset, sections, study, study_storage(storage), sampler, pruner, seed)
    first = spec.first_point()  # the parent run's configuration, but for the searched fields
    tracking_uri = check_sweep_inputs()
    earlier = open_study(spec)
    experiment = experiment or STUDY_FLOW_NAME
    strategy = {"strategy": "optuna", "sampler": sampler, "pruner": pruner, "max_trials": max_trials, "seed": seed}
    strategy.update(study=spec.name, storage=spec.shown_storage, startup_trials=STARTUP_TRIALS)
    strategy["study_trials_before"] = earlier
    parent_run_id = start_sweep_tracking([first], parse_space(space), strategy, experiment, planned=max_trials)
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
