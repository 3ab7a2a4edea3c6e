"""The training flow: download -> vocabulary -> splits -> train -> evaluate -> generate -> MLflow.

Parameters are the preset plus per-section overrides (validated pydantic models), so the Prefect UI shows
them as a form and refuses out-of-range values before a run starts.
"""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow

from deeprnn.config import DataOverrides, ModelOverrides, PresetName, SampleOverrides, TrainOverrides, resolve
from tasks import tracking
from tasks.data import build_vocab, download_corpus, prepare_splits
from tasks.resume import prepare_resume
from tasks.results import check_inputs, log_results, publish_summary, start_tracking
from tasks.training import evaluate_model, generate_samples, train_model

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
    check_inputs(config)
    run_id, run_dir = start_tracking(config, experiment or FLOW_NAME, runs_dir, resume_run_id)
    with tracking.run_status(run_id):  # FAILED/KILLED in MLflow if anything below raises
        corpus = download_corpus(config.data.url, config.data.expected_sha1())
        vocab = build_vocab(corpus, config.data)
        tracking.log_dataset(run_id, corpus, vocab)
        splits = prepare_splits(corpus, vocab, config.data, config.train)
        trained = train_model(config, vocab, splits, run_id, run_dir)
        evaluation = evaluate_model(trained["checkpoint"], splits, config.train.device)
        samples = generate_samples(trained["checkpoint"], config.train.device)
        logged = log_results(run_id, config, vocab, trained, evaluation, samples, corpus.sha1)
        publish_summary(run_id, config, trained, evaluation, samples)
    return {
        "run_id": run_id,
        "experiment": experiment or FLOW_NAME,
        "metrics": logged["metrics"],
        "samples": samples,
        "model": logged["model"],
        "checkpoint": trained["checkpoint"],
        "step_mode": trained["step_mode"],
        "device": trained["device"],
    }
