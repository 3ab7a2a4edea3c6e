"""The training pipeline as Prefect tasks, wired once: download -> prepared tokens and vocabulary -> splits ->
train -> evaluate -> generate -> MLflow.

``run_pipeline`` is the body of the training flow (``train_lm``) and of every sweep trial
(``deeprnn.tasks.trial_task.run_trial``, a task that a sweep sends to its Dask workers), so both run exactly the
same stages.
"""

from __future__ import annotations

import time
from pathlib import Path

from deeprnn.config import RunConfig
from deeprnn.ops.limits import training_timeout_seconds
from deeprnn.tasks.checks_task import check_inputs
from deeprnn.tasks.download_task import download_corpus
from deeprnn.tasks.evaluate_tasks import evaluate_model
from deeprnn.tasks.generate_task import generate_samples
from deeprnn.tasks.prepare_task import prepare_tokens
from deeprnn.tasks.results_tasks import (
    RunResult,
    Timings,
    TokenCache,
    log_results,
    publish_summary,
    start_tracking,
    tracking_experiment,
)
from deeprnn.tasks.size_task import size_configuration
from deeprnn.tasks.splits_task import prepare_splits
from deeprnn.tasks.train_task import outcome, train_model
from deeprnn.tracking import model_registry, runs
from deeprnn.training import stop_signals
from deeprnn.training.resume import LAST


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
    experiment = tracking_experiment(experiment, corpus, parent_run_id)
    if registered_model:  # kept with the run: its resume registers the model there, whoever resumes it
        tags = {**(tags or {}), model_registry.REGISTERED_MODEL_TAG: registered_model}
    run_id, run_dir = start_tracking(
        config, experiment, runs_dir, parent_run_id, run_name, tags, resume_run_id, corpus=corpus
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
        trained = outcome(
            train_model.with_options(timeout_seconds=timeout)(config, vocab, splits, run_id, run_dir, device)
        )
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
