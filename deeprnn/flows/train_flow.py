"""The training flow: check inputs -> download -> prepare -> size to the text -> splits -> train -> evaluate ->
generate -> MLflow. The flow resolves the configuration (or the resumed run's) and hands it to
``deeprnn.tasks.pipeline_tasks.run_pipeline``, which chains the stages' tasks, shared with sweep trials.

Parameters are the preset and its sections (the configuration's own pydantic models, ``deeprnn.flows.parameters``), so
the Prefect UI shows them as a form pre-filled with the deployment's values and refuses out-of-range values
before a run starts.
"""

from __future__ import annotations

from typing import Annotated, Optional

from prefect import flow
from prefect.states import Cancelled

from deeprnn.config import PresetName, default_preset, resolve
from deeprnn.flows.parameters import (
    DataField,
    ExperimentField,
    ModelField,
    RegisteredModelField,
    RunsDirField,
    SampleField,
    TrainField,
    form_field,
)
from deeprnn.tasks.pipeline_tasks import run_pipeline
from deeprnn.tasks.results_tasks import RunResult
from deeprnn.tasks.train_task import prepare_resume
from deeprnn.tracking import naming
from deeprnn.training import stop_signals

FLOW_NAME = "deeprnn-train"


def flow_run_name() -> str:
    """The flow run's name, as the MLflow run's says what ran (``deeprnn.tracking.naming``): preset, corpus and model,
    e.g. ``smoke·faust·lstm1x32``. The corpus's SHA-1 prefix is there when it is known before the download
    (the book's, or one given with the URL); a resumed run is named after the run it continues."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    if params.get("resume_run_id"):
        return f"resume{naming.SEPARATOR}{params['resume_run_id']}"
    try:
        sections = (params.get(k) for k in ("data", "model", "train", "sample"))
        config = resolve(params.get("preset") or "d2l-9.3", *sections)
    except ValueError:  # refused by the flow's own validation right after: any name will do
        return FLOW_NAME
    return naming.run_name(config, naming.corpus_stem(config.data.url), config.data.expected_sha1())


@flow(name=FLOW_NAME, log_prints=True, flow_run_name=flow_run_name)
def train_lm(
    preset: Annotated[Optional[PresetName], form_field("Preset")] = None,
    data: DataField = None,
    model: ModelField = None,
    train: TrainField = None,
    sample: SampleField = None,
    experiment: ExperimentField = None,
    runs_dir: RunsDirField = "runs",
    resume_run_id: Annotated[Optional[str], form_field("Resume MLflow run", max_length=64)] = None,
    registered_model: RegisteredModelField = None,
) -> RunResult:
    """Train a deep RNN language model from a preset (default: the book's D2L 9.3) and track it in MLflow.

    With ``resume_run_id``, continue that MLflow run from its last checkpoint instead: its stored
    configuration is used (``preset`` is ignored; the sections may only restate it or extend the epochs).

    Args:
        preset: Named configuration to start from: d2l-9.3 (the book), full-book, smoke (seconds on a CPU) or
            text (your own text). Empty: d2l-9.3 for the book's corpus, text for any other.
        data: Corpus and split settings; the fields set replace the preset's. Empty: the preset's.
        model: Cell type, depth and width; the fields set replace the preset's. Empty: the preset's.
        train: Epochs, optimizer, device and the rest; the fields set replace the preset's. Empty: the preset's.
        sample: Text generation settings; the fields set replace the preset's. Empty: the preset's.
        experiment: MLflow experiment to log to. Empty: deeprnn-train.
        runs_dir: Folder for checkpoints, one subfolder per run; relative to the worker's working directory.
        resume_run_id: Continue this MLflow run (its id, as `deeprnn run` prints it) from its last checkpoint.
            Empty: a new run.
        registered_model: MLflow registered model the run's model becomes a version of (champion alias per
            registered model). Empty: deeprnn-lm for the book's corpus, deeprnn-<file>-<sha1 prefix> otherwise.
    """
    # Prefect's flow engine replaced the command's SIGTERM handler with its own (it raises at once, wherever
    # the run is): a `deeprnn` command's run stops at a safe point instead, on SIGINT and SIGTERM alike.
    stop_signals.reassert()
    try:
        if resume_run_id:
            config, experiment = prepare_resume(resume_run_id, runs_dir, experiment, data, model, train, sample)
        else:
            default = default_preset(data.url if data is not None else None)
            config = resolve(preset or default, data, model, train, sample)
        return run_pipeline(
            config, experiment or FLOW_NAME, runs_dir, resume_run_id=resume_run_id, registered_model=registered_model
        )
    except stop_signals.StopRequested as exc:
        # Stopped on purpose (SIGINT, SIGTERM): the flow run ends Cancelled, not Crashed (which alerts).
        stop_signals.remember(exc)
        return Cancelled(message=stop_message(exc))  # type: ignore[return-value]  # Prefect takes it as the end state


def stop_message(exc: stop_signals.StopRequested) -> str:
    """The Cancelled state's message: the signal, and how the MLflow run continues, if it can."""
    if exc.run_id is None:
        return f"stopped by {exc.signal_name} before the MLflow run was opened"
    if exc.checkpoint is None:
        return f"stopped by {exc.signal_name}: MLflow run {exc.run_id} KILLED before its first checkpoint"
    name, run_id = exc.signal_name, exc.run_id
    return f"stopped by {name}: MLflow run {run_id} KILLED; continue with: deeprnn run --resume {run_id}"
