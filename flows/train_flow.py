"""The training flow: download -> vocabulary -> splits -> train -> evaluate -> generate -> MLflow
(the stages are wired in ``flows.pipeline.run_pipeline``, shared with sweep trials).

Parameters are the preset plus per-section overrides (validated pydantic models), so the Prefect UI shows
them as a form and refuses out-of-range values before a run starts.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow

from deeprnn.config import DataOverrides, ModelOverrides, PresetName, SampleOverrides, TrainOverrides, resolve
from flows.pipeline import run_pipeline
from tasks.resume import prepare_resume

FLOW_NAME = "deeprnn-train"


@flow(name=FLOW_NAME, log_prints=True)
def train_lm(
    preset: PresetName = "d2l-9.3",
    data: Optional[DataOverrides] = None,  # type: ignore[valid-type]
    model: Optional[ModelOverrides] = None,  # type: ignore[valid-type]
    train: Optional[TrainOverrides] = None,  # type: ignore[valid-type]
    sample: Optional[SampleOverrides] = None,  # type: ignore[valid-type]
    experiment: Optional[str] = None,
    runs_dir: str = "runs",
    resume_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Train a deep RNN language model from a preset (default: the book's D2L 9.3) and track it in MLflow.

    With ``resume_run_id``, continue that MLflow run from its last checkpoint instead: its stored
    configuration is used (``preset`` is ignored; overrides may only restate it or extend the epochs).
    """
    if resume_run_id:
        config, experiment = prepare_resume(resume_run_id, runs_dir, experiment, data, model, train, sample)
    else:
        config = resolve(preset, data, model, train, sample)
    return run_pipeline(config, experiment or FLOW_NAME, runs_dir, resume_run_id=resume_run_id)
