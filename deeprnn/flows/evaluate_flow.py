"""The evaluation flow: a logged model -> the text it never trained on -> perplexity and samples -> MLflow.

By default it evaluates the registered model's champion. The ``evaluate`` deployment in ``prefect.yaml`` is
triggered by every completed training flow run and evaluates the model that run logged.
"""

from __future__ import annotations

import tempfile
from typing import Annotated, Optional

from prefect import flow

from deeprnn.config import DeviceName
from deeprnn.flows.parameters import ExperimentField, SampleField, form_field
from deeprnn.tasks import evaluate_tasks as tasks
from deeprnn.tasks.evaluate_tasks import CHAMPION_URI, EvaluationResult
from deeprnn.tasks.pipeline_tasks import download_corpus, prepare_splits, prepare_tokens
from deeprnn.tracking import runs

FLOW_NAME = "deeprnn-evaluate"
MODEL_URI_PATTERN = r"^(models|runs):/\S+$"
FLOW_RUN_ID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


@flow(name=FLOW_NAME, log_prints=True)
def evaluate_lm(
    model_uri: Annotated[str, form_field("Model URI", max_length=1024, pattern=MODEL_URI_PATTERN)] = CHAMPION_URI,
    training_flow_run_id: Annotated[Optional[str], form_field("Training flow run", pattern=FLOW_RUN_ID_PATTERN)] = None,
    sample: SampleField = None,
    device: Annotated[DeviceName, form_field("Device")] = "auto",
    experiment: ExperimentField = None,
) -> EvaluationResult:
    """Measure a logged model's perplexity on its held-out text and generate samples; log to MLflow and Prefect.

    Args:
        model_uri: MLflow model to evaluate: models:/deeprnn-lm@champion (default), models:/deeprnn-lm/3 or
            runs:/<run_id>/model.
        training_flow_run_id: Evaluate the model logged by this training flow run instead of model_uri
            (the deployment trigger sets it). Empty: use model_uri.
        sample: Text generation settings; the fields set replace the model's own. Empty: the model's.
        device: auto picks cuda, then mps, then cpu.
        experiment: MLflow experiment to log to. Empty: deeprnn-evaluate.
    """
    uri = tasks.choose_model(model_uri, training_flow_run_id)
    run_id = tasks.start_evaluation(uri, device, experiment or FLOW_NAME)
    # FAILED/KILLED in MLflow if anything raises; the downloaded model is removed at the end (MLflow keeps it).
    with runs.run_status(run_id), tempfile.TemporaryDirectory(prefix="deeprnn-evaluate-") as folder:
        model = tasks.fetch_model(run_id, uri, folder, sample)
        corpus = download_corpus(model.config.data.url, model.corpus_sha1)
        prepared = prepare_tokens(corpus, model.config.data)
        splits = prepare_splits(prepared, model.config.data, model.config.train, model.vocab)
        evaluation = tasks.evaluate_model(model.checkpoint, splits, device)
        samples = tasks.generate_samples(model.checkpoint, device, model.config.sample)
        tasks.publish_evaluation(run_id, model, evaluation, samples)
    return EvaluationResult(
        run_id, experiment or FLOW_NAME, model.model_uri, model.version, model.source_run_id, evaluation, samples
    )
