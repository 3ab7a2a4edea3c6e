"""The evaluate and generate stages as Prefect tasks: ``evaluate-model`` measures a checkpoint's perplexity on each
split and ``generate-samples`` continues every prefix with it (for the training flow and the evaluation flow);
the evaluation flow's own tasks choose a logged model, open its MLflow run, fetch the model with what rebuilds
its held-out text, and publish the results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.runtime import flow_run
from pydantic import BaseModel

from deeprnn.config import RunConfig, SampleConfig, section_values
from deeprnn.data.batching import Splits
from deeprnn.data.vocab import Vocab
from deeprnn.device import as_device, resolve_device
from deeprnn.generate import generate_batch
from deeprnn.pipeline import Evaluation, evaluate_splits
from deeprnn.report import fmt, samples_text
from deeprnn.tasks.results_tasks import open_run, summary_markdown
from deeprnn.tracking import metrics, model_registry, runs, store
from deeprnn.training import checkpoint

CHAMPION_URI = f"models:/{model_registry.REGISTERED_MODEL}@{model_registry.CHAMPION}"
EVALUATION_SUMMARY = "deeprnn-evaluation-summary"  # the key of the Prefect markdown artifact


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(checkpoint_path: str, splits: Splits, device: torch.device | str) -> Evaluation:
    """Perplexity of the selected model on each split (eval mode, token-weighted)."""
    model, _, config = checkpoint.restore_model(checkpoint.load(Path(checkpoint_path)), as_device(device))
    result = evaluate_splits(model, splits, config.train)
    shown = [f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in result.metrics().items() if v]
    get_run_logger().info("evaluation: %s", ", ".join(shown))
    return result


@task(name="generate-samples", cache_policy=NO_CACHE)
def generate_samples(
    checkpoint_path: str, device: torch.device | str, sample: SampleConfig | None = None
) -> dict[str, str]:
    """Continue each prefix with the selected model (greedy unless a temperature is set); ``sample`` replaces
    the checkpoint's own sample settings."""
    model, voc, config = checkpoint.restore_model(checkpoint.load(Path(checkpoint_path)), as_device(device))
    s = sample or config.sample
    sampling = s.model_dump(include={"temperature", "top_k", "seed"})
    # All prefixes as one batch: one forward step per generated token for all of them; each prefix normalized as
    # the corpus's rule wrote the training text.
    texts = generate_batch(
        model, voc, s.prefixes, s.num_tokens, token=config.data.token, normalize=config.data.normalize, **sampling
    )
    samples = dict(zip(s.prefixes, texts))
    for text in samples.values():
        get_run_logger().info("sample: %s", text)
    return samples


@dataclass(frozen=True)
class FetchedModel(model_registry.DownloadedModel):
    """A logged model on local disk, with what the evaluation needs to rebuild the text it was tested on."""

    config: RunConfig  # the training configuration (corpus, splits), with the requested sample settings
    vocab: Vocab  # the vocabulary it was trained with: the held-out text is encoded with it
    corpus_sha1: str | None  # the corpus bytes the training run read; the evaluation must read the same
    trained_metrics: dict[str, float]  # held-out perplexities the training run reported


@dataclass(frozen=True)
class EvaluationResult:
    """What the evaluation flow returns: its MLflow run, the model it measured, perplexities and samples."""

    run_id: str
    experiment: str
    model_uri: str  # pinned to a version when it was an alias
    version: str | None
    source_run_id: str | None
    evaluation: Evaluation
    samples: dict[str, str]  # prefix -> generated text


@task(name="choose-model", cache_policy=NO_CACHE)
def choose_model(model_uri: str, training_flow_run_id: str | None) -> str:
    """The model to evaluate: the one logged by training flow run ``training_flow_run_id`` when given (the
    trigger passes it), else ``model_uri``."""
    if not training_flow_run_id:
        return model_uri
    uri = f"runs:/{runs.run_for_flow_run(training_flow_run_id)}/model"
    get_run_logger().info("training flow run %s logged %s", training_flow_run_id, uri)
    return uri


@task(
    name="start-evaluation-run",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    # A missing device or an unreachable store fails the same way again: only MLflow and I/O faults retry.
    retry_condition_fn=store.retry_on_io_faults(store.TrackingUnavailableError),
)
def start_evaluation(model_uri: str, device: str, experiment: str) -> str:
    """Refuse a missing device or an unreachable MLflow, then open the evaluation's MLflow run (tags link the
    Prefect flow run; a retry finds the run its first attempt created); returns its id."""
    resolve_device(device)
    store.check_reachable()
    tags = {"deeprnn.requested_model_uri": model_uri}
    run_id = open_run(experiment, tags, {"requested_model_uri": model_uri, "device": device})
    get_run_logger().info("MLflow evaluation run %s in experiment %r", run_id, experiment)
    return run_id


@task(name="fetch-model", cache_policy=NO_CACHE)
def fetch_model(run_id: str, model_uri: str, folder: str, sample: BaseModel | dict[str, Any] | None) -> FetchedModel:
    """Download the model into ``folder``, read the configuration stored in its checkpoint, apply ``sample``
    overrides, and log the model's identity and training configuration as params of the evaluation run."""
    found = model_registry.fetch_model(model_uri, Path(folder))
    data = checkpoint.load(Path(found.checkpoint))
    config = RunConfig.model_validate(data["config"])
    # The sample fields given; the others stay the model's own.
    merged = SampleConfig.model_validate({**config.sample.model_dump(), **section_values(sample)})
    config = config.model_copy(update={"sample": merged})
    source_metrics = runs.get_run(found.source_run_id).metrics if found.source_run_id else {}
    trained = {k: source_metrics[k] for k in ("val_perplexity", "test_perplexity") if k in source_metrics}
    identity = {"model_uri": found.model_uri, "model_version": found.version, "source_run_id": found.source_run_id}
    runs.log_params(run_id, {**identity, **config.flat()})
    runs.set_tags(run_id, {"deeprnn.source_run_id": found.source_run_id or "", "deeprnn.preset": config.preset})
    get_run_logger().info(
        "model %s (version %s) from training run %s", found.model_uri, found.version, found.source_run_id
    )
    sha1 = found.dataset_sha1 or config.data.expected_sha1()
    vocab = Vocab.from_dict(data["vocab"])
    return FetchedModel(**vars(found), config=config, vocab=vocab, corpus_sha1=sha1, trained_metrics=trained)


@task(name="publish-evaluation", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def publish_evaluation(run_id: str, model: FetchedModel, evaluation: Evaluation, samples: dict[str, str]) -> str:
    """Log perplexities and samples to the evaluation's MLflow run, and a markdown summary to Prefect.

    Safe to retry: metrics already logged are not logged again, text artifacts are rewritten in place, and the
    summary is created once per flow run."""
    metrics.log_metrics_once(run_id, evaluation.metrics())
    samples_json = json.dumps(samples, ensure_ascii=False, indent=1)
    runs.log_texts(run_id, {"samples.txt": samples_text(samples), "samples.json": samples_json})

    table = [
        "| metric | this evaluation | reported by training |",
        "| --- | --- | --- |",
        *[
            f"| {key} | {fmt(evaluation.metrics().get(key))} | {fmt(model.trained_metrics.get(key))} |"
            for key in ("val_perplexity", "test_perplexity")
        ],
        f"| train_perplexity_eval | {fmt(evaluation.train_perplexity_eval)} | |",
    ]
    source = f"; trained by run `{model.source_run_id}` ({model.config.preset} preset)"
    markdown = summary_markdown(f"# deeprnn evaluation of `{model.model_uri}`", run_id, table, samples, source)
    if not flow_run_has_artifact(EVALUATION_SUMMARY):
        create_markdown_artifact(markdown, key=EVALUATION_SUMMARY, description="deeprnn evaluation summary")
    return markdown


def flow_run_has_artifact(key: str) -> bool:
    """True when the current flow run already has an artifact with this key (an earlier attempt made it)."""
    run_id = flow_run.get_id()
    if not run_id:
        return False
    only = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
    with get_client(sync_client=True) as client:
        return bool(client.read_artifacts(artifact_filter=only, limit=1))
