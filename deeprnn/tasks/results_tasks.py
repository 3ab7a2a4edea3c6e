"""Prefect tasks that publish a run's results: MLflow metrics, artifacts and model; a Prefect summary."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.runtime import deployment, flow_run, task_run
from prefect.settings import PREFECT_UI_URL

from deeprnn.config import DataConfig, RunConfig
from deeprnn.data.download import CorpusFile
from deeprnn.data.vocab import Vocab
from deeprnn.ops.orphans import process_tags
from deeprnn.pipeline import Evaluation, TrainingOutcome
from deeprnn.report import fmt, plot_history, samples_markdown, samples_text
from deeprnn.tracking import metrics, model_registry, naming, runs, store
from deeprnn.training.resume import RESUMABLE, run_folder


@dataclass(frozen=True)
class Registration:
    """The registered version a logged model became."""

    registered_model: str
    version: str
    champion: bool  # whether it holds the champion alias


@dataclass(frozen=True)
class PublishedModel:
    """The run's logged model, what it is compared by, and (once registered) its version."""

    logged: model_registry.LoggedModel
    metrics: dict[str, float]  # the run's final values linked to the model (MODEL_METRICS)
    heldout_key: str  # champions are compared on the same held-out text only (heldout_text_key)
    heldout_score: float  # validation perplexity, else test perplexity
    register_as: str  # the registered model it becomes a version of
    facts: model_registry.ModelFacts
    sample: str | None  # the first generated sample
    registration: Registration | None = None  # None: not registered (a sweep trial's, until it is the best)


@dataclass(frozen=True)
class TokenCache:
    """The token cache entry a run trained from."""

    folder: str
    cache_hit: bool  # found there: nothing was tokenized
    num_tokens: int


@dataclass(frozen=True)
class Timings:
    """Wall-clock stamps (time.time()) of a run's stages, for the pipeline benchmark's breakdown."""

    pipeline_started_at: float
    fit_started_at: float
    fit_finished_at: float
    evaluated_at: float
    logged_at: float
    cli_ready_at: float | None = None  # set by the CLI: imports done and the Prefect API answering
    flow_returned_at: float | None = None  # set by the CLI

    def in_order(self) -> dict[str, float]:
        """The stamps that are set, in the order the stages ran (the CLI's readiness first)."""
        stamps = {"cli_ready_at": self.cli_ready_at, **asdict(self)}  # a key keeps its first place
        return {name: value for name, value in stamps.items() if value is not None}


@dataclass(frozen=True)
class RunResult:
    """What one training run (the training flow, or one sweep trial) returns."""

    run_id: str
    experiment: str
    training: TrainingOutcome
    evaluation: Evaluation
    samples: dict[str, str]  # prefix -> generated text
    model: PublishedModel
    tokens: TokenCache
    timings: Timings

    def metrics(self) -> dict[str, float | None]:
        """The run's final metrics, as MLflow records them."""
        return {**self.training.metrics(), **self.evaluation.metrics()}

    def as_record(self) -> dict[str, Any]:
        """The result as plain JSON-ready data (``deeprnn run --json``)."""
        record: dict[str, Any] = {"run_id": self.run_id, "experiment": self.experiment, "metrics": self.metrics()}
        record.update(samples=self.samples, model=asdict(self.model), checkpoint=self.training.checkpoint)
        trained = ("step_mode", "precision", "device", "fit_started_at", "fit_finished_at")
        record.update(tokens=asdict(self.tokens), **{key: getattr(self.training, key) for key in trained})
        return record | {"timings": self.timings.in_order()}


@task(
    name="log-results",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=store.retry_on_io_faults(),  # not a full artifact store: seconds later it is still full
)
def log_results(
    run_id: str,
    config: RunConfig,
    vocab: Vocab,
    trained: TrainingOutcome,
    evaluation: Evaluation,
    samples: dict[str, str],
    corpus_sha1: str,
    register: bool = True,
    registered_model: str | None = None,
) -> PublishedModel:
    """Log final metrics, vocabulary, samples, curve, history and the model (registered and champion if
    best, unless ``register`` is off: a sweep registers only its best trial's model).

    Safe to retry: the model, its version and its metrics are looked up before they are created, so a retry
    after a partial write finishes the job instead of registering a second version."""
    metrics.log_metrics(run_id, {**trained.metrics(), **evaluation.metrics()}, step=trained.epochs_done)
    as_json = {"vocab.json": vocab.to_dict(), "samples.json": samples, "config.json": config.model_dump(mode="json")}
    texts = {name: json.dumps(value, ensure_ascii=False, indent=1) for name, value in as_json.items()}
    texts["samples.txt"] = samples_text(samples)
    with tempfile.TemporaryDirectory() as tmp:
        plot = plot_history(trained.history, Path(tmp) / "perplexity.png", f"{config.preset}: perplexity per epoch")
        runs.log_texts(run_id, texts, [plot])  # one upload
    runs.set_tags(run_id, {"deeprnn.step_mode": trained.step_mode, "deeprnn.precision": trained.precision})

    # The model, logged once with its held-out perplexities; registered (once) as ``registered_model``, by
    # default per corpus (``model_registry.default_registered_model``), the champion alias moved if it is best.
    name = registered_model or model_registry.default_registered_model(config.data.url, corpus_sha1)
    logged = model_registry.log_model(run_id, Path(trained.checkpoint), config.sample.prefixes[0])
    url = config.flat()["data.url"]  # without credentials
    perplexities = {k: getattr(evaluation, k) for k in MODEL_METRICS}
    facts = model_registry.ModelFacts(config.preset, url, corpus_sha1, config.data.token, perplexities)
    model = PublishedModel(
        logged=logged,
        metrics=model_registry.link_model_metrics(run_id, logged.model_id, MODEL_METRICS),
        # Champions are compared on the same held-out text only: same corpus bytes, same split.
        heldout_key=heldout_text_key(config.data, corpus_sha1),
        heldout_score=evaluation.val_perplexity or evaluation.test_perplexity,
        register_as=name,
        facts=facts,
        sample=next(iter(samples.values()), None),
    )
    shown = "not registered"
    if register:
        r = register_version(model, name, run_id)
        model = replace(model, registration=r)
        shown = f"registered {r.registered_model} v{r.version}" + (", now champion" if r.champion else "")
    get_run_logger().info("model logged: %s (%s)", model.logged.model_uri, shown)
    return model


def heldout_text_key(data: DataConfig, corpus_sha1: str) -> str:
    """What makes two held-out perplexities comparable: the same corpus bytes, the same tokens and the same
    split. The book's tokenization keeps the key it always had, so earlier champions stay comparable."""
    key = f"{corpus_sha1}:{data.token}:val={data.val_fraction}:test={data.test_fraction}"
    if (data.normalize, data.min_freq, data.reserved_tokens) != ("d2l", 0, []):
        key += f":normalize={data.normalize}:min_freq={data.min_freq}:reserved={','.join(data.reserved_tokens)}"
    return key


# The evaluation metrics the logged model carries (ranked by in the Models tab and search_logged_models).
MODEL_METRICS = ["val_perplexity", "test_perplexity", "train_perplexity_eval"]


def register_version(model: PublishedModel, name: str, run_id: str) -> Registration:
    """Register the logged ``model`` as a version of ``name``, once per run, describe it, and promote it to
    champion if it beats the current one."""
    score, key = model.heldout_score, model.heldout_key
    # The version's tags go with its creation: one request instead of two for each tag.
    tags = {**model.facts.tags(), **model_registry.heldout_tags(score, key)}
    version, created = model_registry.register_tagged(model.logged.model_uri, name, run_id, tags)
    model_registry.describe_version(name, version, model.logged.model_id, model.facts, model.sample, tagged=created)
    champion = model_registry.promote_if_better(name, version, score, key, tagged=created)
    return Registration(name, version, champion)


def summary_markdown(title: str, run_id: str, table: list[str], samples: dict[str, str], source: str = "") -> str:
    """A Prefect summary artifact: the title, the MLflow run (and ``source``, what it came from), the table of
    metrics, then the samples."""
    run_line = f"MLflow run: {runs.run_markdown(run_id)}{source}"
    return "\n".join([title, "", run_line, "", *table, "", *samples_markdown(samples)])


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(
    run_id: str, config: RunConfig, trained: TrainingOutcome, evaluation: Evaluation, samples: dict[str, str]
) -> str:
    """A markdown artifact on the Prefect run: perplexities, speed, device, samples, link to MLflow."""
    table = [
        "| metric | value |",
        "| --- | --- |",
        f"| final training perplexity | {fmt(trained.final_train_perplexity)} |",
        f"| best held-out perplexity (epoch {trained.best_epoch}) | {fmt(trained.best_heldout_perplexity)} |",
        f"| validation perplexity ({evaluation.val_tokens or 0:,.0f} tokens) | {fmt(evaluation.val_perplexity)} |",
        f"| test perplexity ({evaluation.test_tokens or 0:,.0f} tokens) | {fmt(evaluation.test_perplexity)} |",
        f"| tokens/s | {trained.tokens_per_sec:,.0f} |",
        f"| training time | {trained.train_seconds:.1f} s |",
        f"| device / step / precision | {trained.device} / {trained.step_mode} / {trained.precision} |",
    ]
    markdown = summary_markdown(f"# deeprnn run ({config.preset})", run_id, table, samples)
    create_markdown_artifact(markdown, key="deeprnn-train-summary", description="deeprnn training summary")
    return markdown


def run_tags() -> dict[str, str]:
    """MLflow tags that link a run to the Prefect flow run (and deployment) it belongs to, and to this process:
    host, pid and its start time, so that a later command can tell when the process is gone."""
    context = FlowRunContext.get()
    # prefect.runtime.deployment reads the flow run back from the API (a new client and two requests) even
    # when the flow run at hand says it has no deployment: only a deployment's run needs asking.
    no_deployment = context is not None and context.flow_run is not None and context.flow_run.deployment_id is None
    tags = {
        **process_tags(),
        "prefect.flow_run_id": str(flow_run.get_id() or ""),
        "prefect.flow_run_name": str(flow_run.get_name() or ""),
        "prefect.flow_name": str(flow_run.get_flow_name() or ""),
        "prefect.deployment": "" if no_deployment else str(deployment.get_name() or ""),
    }
    if PREFECT_UI_URL.value():  # no UI behind an ephemeral or temporary API: no link rather than a broken one
        tags["prefect.flow_run_url"] = str(flow_run.get_flow_run_ui_url())
    return tags


def open_run(experiment: str, tags: dict[str, str], params: dict[str, Any]) -> str:
    """A new MLflow run named after the flow run, tagged with ``run_tags()`` and ``tags``; a retry of the task
    that opens it finds the run its first attempt created. Returns its id."""
    return runs.create_run(experiment, flow_run.get_name(), run_tags() | tags, params, opened_by=task_run.get_id())


@task(name="start-mlflow-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_tracking(
    config: RunConfig,
    corpus: CorpusFile,
    experiment: str,
    runs_dir: str,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
) -> tuple[str, str, str]:
    """Open the MLflow run (params, tags linking the Prefect flow run), nested under ``parent_run_id`` if
    given, or set run ``resume_run_id`` back to RUNNING to continue it; returns the run id, its local run
    folder and its experiment.

    The run is named after what it trains (``deeprnn.tracking.naming.run_name``) unless ``run_name`` is given,
    and a run of a text other than the book that would go to the default experiment (``deeprnn-train``, the
    book's) goes to that text's own; a sweep's trial stays with its parent run."""
    if parent_run_id is None and experiment == naming.BOOK_EXPERIMENT:
        experiment = naming.experiment_name(naming.corpus_stem(corpus.source), corpus.sha1)
    tags = {**(extra_tags or {}), **run_tags(), "deeprnn.preset": config.preset}
    if resume_run_id:
        # Params stay as first logged (MLflow never changes them); what a resume may change goes into tags.
        flat = config.flat()
        tags.update({f"resumed.{key}": str(flat[key]) for key in sorted(RESUMABLE)})
        runs.reopen_run(resume_run_id, tags)
        run_id = resume_run_id
    else:
        name = run_name or naming.run_name(config, naming.corpus_stem(corpus.source), corpus.sha1)
        # A retry of this task finds the run its first attempt created.
        run_id = runs.start_run(config, experiment, name, tags, parent_run_id, opened_by=task_run.get_id())
    # The folder is named by the run id (letters and digits only), never by a user-given name.
    run_dir = run_folder(runs_dir, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    # No `--resume` offered here: a run stopped before its first checkpoint has nothing to resume from.
    get_run_logger().info("MLflow run %s in experiment %r; checkpoints in %s", run_id, experiment, run_dir)
    return run_id, str(run_dir), experiment
