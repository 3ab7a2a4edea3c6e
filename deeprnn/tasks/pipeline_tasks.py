"""The training pipeline as Prefect tasks, wired once: check inputs -> download -> prepared tokens and vocabulary
-> size to the text -> splits -> train -> evaluate -> generate -> MLflow.

The data stages' tasks live here (``check-inputs``, ``download-corpus``, ``prepare-tokens``, ``size-to-text``,
``prepare-splits``), each a call into the library with its Prefect concerns; training, evaluation and results have
modules of their own. ``run_pipeline`` is the body of the training flow (``train_lm``) and of every sweep trial
(``deeprnn.tasks.sweep_tasks.run_trial``, a task that a sweep sends to its Dask workers), so both run exactly the
same stages. The evaluation flow runs download, prepare and splits for a logged model, the prepare flow the first
two.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.states import State

from deeprnn.config import DataConfig, RunConfig, TrainConfig
from deeprnn.data.batching import Splits
from deeprnn.data.download import CorpusFile, TransientDownloadError, fetch_corpus
from deeprnn.data.prepare import PreparedCorpus, dropped_letters_warning, prepare, prepared_summary
from deeprnn.data.vocab import Vocab
from deeprnn.device import resolve_device
from deeprnn.ops.limits import training_timeout_seconds
from deeprnn.pipeline import make_splits
from deeprnn.sizing import decided_later, size_to_text
from deeprnn.tasks.evaluate_tasks import evaluate_model, generate_samples
from deeprnn.tasks.results_tasks import RunResult, Timings, TokenCache, log_results, publish_summary, start_tracking
from deeprnn.tasks.train_task import train_model
from deeprnn.tracking import model_registry, naming, runs, store
from deeprnn.training import stop_signals
from deeprnn.training.resume import LAST


@task(name="check-inputs", cache_policy=NO_CACHE)
def check_inputs(config: RunConfig) -> torch.device:
    """Refuse what would fail later, before any download or training: a missing device, an unreachable
    MLflow. Returns the device, resolved once for the whole run: the later tasks take it as it is."""
    device = resolve_device(config.train.device)
    uri = store.check_reachable()
    get_run_logger().info("device %s, MLflow tracking at %s", device, uri)
    return device


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only network faults (timeouts, refused connections, 5xx), never 4xx or hash mismatches."""
    return isinstance(state.result(raise_on_failure=False), TransientDownloadError)  # the failed state's error


# The one retry layer for downloads (fetch_corpus itself makes one attempt) and no Prefect cache: the
# library's hash-checked cache is the one cache, checked on every run, so a deleted or corrupted copy is
# always fetched again and another DEEPRNN_CACHE_DIR never reuses this one's result.
@task(
    name="download-corpus", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=_transient
)
def download_corpus(source: str, expected_sha1: str | None) -> CorpusFile:
    """Fetch the corpus into the hash-checked cache (no network when the cache is valid)."""
    try:
        corpus = fetch_corpus(source, expected_sha1)
    except TransientDownloadError as exc:
        context = TaskRunContext.get()
        if context is None:  # called as a plain function: no retries to speak of
            raise
        attempt, attempts = context.task_run.run_count, context.task.retries + 1
        if attempt < attempts:
            get_run_logger().warning("%s; attempt %d of %d, Prefect retries it", exc, attempt, attempts)
            raise
        raise TransientDownloadError(f"{exc}; gave up after {attempts} attempts") from None
    get_run_logger().info(
        "corpus %s (%s): %d bytes, sha1 %s", corpus.source, corpus.kind, corpus.num_bytes, corpus.sha1
    )
    return corpus


@task(name="prepare-tokens", cache_policy=NO_CACHE)
def prepare_tokens(corpus: CorpusFile, data: DataConfig) -> PreparedCorpus:
    """Tokenize the corpus once into the token cache, or find it there (then nothing is tokenized again)."""
    prepared = prepare(corpus, data)
    logger = get_run_logger()
    logger.info(prepared_summary(prepared))
    if warning := dropped_letters_warning(prepared):
        logger.warning(warning)
    return prepared


@task(name="size-to-text", cache_policy=NO_CACHE)
def size_configuration(
    config: RunConfig, prepared: PreparedCorpus, run_id: str, device: torch.device, corpus_source: str | None = None
) -> RunConfig:
    """Decide what the configuration leaves to the text (``model.size = "auto"``, empty prefixes), say what
    was chosen and why, and log the decided values as the run's params; with ``corpus_source``, name the run
    (the MLflow run and the Prefect flow run it belongs to) after the sized model. Other configurations pass
    unchanged."""
    later = decided_later(config)
    if not later:
        return config
    sized = size_to_text(config, torch.from_numpy(prepared.ids()), prepared.vocab(), device, prepared.corpus_sha1)
    logger = get_run_logger()
    for note in sized.notes:
        logger.info(note)
    flat = sized.config.flat()
    runs.log_params(run_id, {key: flat[key] for key in sorted(later)})
    if corpus_source is not None:
        name = naming.run_name(sized.config, naming.corpus_stem(corpus_source), prepared.corpus_sha1)
        runs.set_tags(run_id, {"mlflow.runName": name, **_rename_flow_run(name)})
        logger.info(f"run named for the sized model: {name}")
    return sized.config


_RENAMED: dict[str, str] = {}  # flow run id -> its name since sizing


def _rename_flow_run(name: str) -> dict[str, str]:
    """Rename the flow run this task runs in (in the API and in this process); returns the MLflow tag that says
    so, none outside a flow run."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return {}
    with get_client(sync_client=True) as client:
        client.set_flow_run_name(context.flow_run.id, name)
    context.flow_run.name = name  # what prefect.runtime.flow_run.get_name() answers from now on
    _RENAMED[str(context.flow_run.id)] = name
    return {"prefect.flow_run_name": name}


def _renamed_flow_runs(record: logging.LogRecord) -> bool:
    """The new name on the flow-run engine's own log lines (``Finished in state ...``): its logger keeps the
    name the flow run started with. Renames, never drops."""
    name = _RENAMED.get(str(getattr(record, "flow_run_id", "")))
    if name is not None:
        record.flow_run_name = name
    return True


logging.getLogger("prefect.flow_runs").addFilter(_renamed_flow_runs)


@task(name="prepare-splits", cache_policy=NO_CACHE)
def prepare_splits(
    prepared: PreparedCorpus, data: DataConfig, train: TrainConfig, vocab: Vocab | None = None
) -> Splits:
    """Cut the cached token ids into train/validation/test (views of the memory map, nothing copied); refuse a
    training part too short for one minibatch, and ids made with another vocabulary than ``vocab``."""
    splits = make_splits(prepared, data, train, vocab)
    sizes = (splits.train.numel(), splits.val.numel(), splits.test.numel())
    get_run_logger().info("tokens: %d train, %d validation, %d test", *sizes)
    return splits


def run_pipeline(
    config: RunConfig,
    experiment: str,
    runs_dir: str,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    register_model: bool = True,
    resume_run_id: str | None = None,
    registered_model: str | None = None,
) -> RunResult:
    """Train, evaluate and log one model as one MLflow run (nested under ``parent_run_id`` when given), or
    continue run ``resume_run_id`` from its last checkpoint; the model is registered as ``registered_model``
    (default: per corpus) unless ``register_model`` is off."""
    flow_started_at = time.time()
    device = check_inputs(config)  # resolved once: every later task takes it as it is
    # The corpus first: its bytes name the run and its experiment (a text that cannot be had leaves no run).
    corpus = download_corpus(config.data.url, config.data.expected_sha1())
    if registered_model:  # kept with the run: its resume registers the model there, whoever resumes it
        tags = {**(tags or {}), model_registry.REGISTERED_MODEL_TAG: registered_model}
    run_id, run_dir, experiment = start_tracking(
        config, corpus, experiment, runs_dir, parent_run_id, run_name, tags, resume_run_id
    )
    if resume_run_id and not registered_model:
        registered_model = runs.find_run(run_id).tags.get(model_registry.REGISTERED_MODEL_TAG)
    if parent_run_id is None:  # a stop that must end the process at once still names the run to continue
        stop_signals.note_what_a_stop_leaves(f"MLflow run {run_id}: continue it with `deeprnn run --resume {run_id}`")
    # FAILED/KILLED in MLflow if anything below raises; a stopped run says whether it can be resumed.
    with runs.run_status(run_id, checkpoint=Path(run_dir) / LAST):
        prepared = prepare_tokens(corpus, config.data)
        # The text preset's size and the prefixes from the text; a run named by us is renamed for its model.
        rename = run_name is None and resume_run_id is None
        config = size_configuration(config, prepared, run_id, device, corpus.source if rename else None)
        vocab = prepared.vocab()
        runs.log_dataset(run_id, corpus, vocab, prepared.num_tokens)
        splits = prepare_splits(prepared, config.data, config.train)
        timeout = training_timeout_seconds(config.train, splits.train.numel())  # the user's, or derived
        trained = train_model.with_options(timeout_seconds=timeout)(config, vocab, splits, run_id, run_dir, device)
        if isinstance(trained, State):  # a stop ended it, its task run Cancelled: the stop raised again here
            raise stop_signals.StopRequested(stop_signals.requested() or signal.SIGINT)
        evaluation = evaluate_model(trained.checkpoint, splits, device)
        samples = generate_samples(trained.checkpoint, device)
        evaluated_at = time.time()
        model = log_results(
            run_id, config, vocab, trained, evaluation, samples, corpus.sha1, register_model, registered_model
        )
        publish_summary(run_id, config, trained, evaluation, samples)
        logged_at = time.time()
    tokens = TokenCache(str(prepared.folder), prepared.cache_hit, prepared.num_tokens)
    timings = Timings(flow_started_at, trained.fit_started_at, trained.fit_finished_at, evaluated_at, logged_at)
    return RunResult(run_id, experiment, trained, evaluation, samples, model, tokens, timings)
