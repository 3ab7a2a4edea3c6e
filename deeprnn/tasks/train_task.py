"""The training stage as a Prefect task: one call into the library's training stage, with its progress in
Prefect (log lines, a progress artifact) and every epoch, step and checkpoint in MLflow."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, State

from deeprnn.config import RunConfig, TrainConfig
from deeprnn.data.batching import Splits
from deeprnn.data.vocab import Vocab
from deeprnn.pipeline import TrainingHooks, TrainingOutcome, start_training
from deeprnn.tasks import step_watch
from deeprnn.tracking import metrics, run_checkpoints, runs, store
from deeprnn.training import stop_signals
from deeprnn.training.progress import EpochStats, StepStats, progress_line
from deeprnn.training.resume import LAST

Logger = logging.Logger | logging.LoggerAdapter[Any]  # what get_run_logger returns

_LOG_SECONDS = 30.0  # inside a long epoch, a progress line (and progress update) at most this often


def _worth_a_line(s: StepStats, cfg: TrainConfig, seconds_since_last: float) -> bool:
    """Log every ``log_every`` epochs, the last epoch, every held-out measurement, and at most every
    ``_LOG_SECONDS`` inside a long epoch."""
    if s.epoch_end and (s.epoch % cfg.log_every == 0 or s.epoch == cfg.epochs or s.step == s.total_steps):
        return True
    return s.heldout_perplexity is not None or seconds_since_last >= _LOG_SECONDS


def _hooks(
    run_id: str, cfg: TrainConfig, curves: metrics.MetricLogger, progress: UUID, logger: Logger
) -> TrainingHooks:
    """Every epoch and step to MLflow, a progress line and the progress artifact now and then, each checkpoint
    logged as an artifact; Ctrl-C is held back while they write, and raised when they are done."""
    last_line = [time.perf_counter()]
    # A run that counts in steps (budget, evaluations or checkpoints) gets step_* curves in MLflow.
    uses_steps = any(v is not None for v in (cfg.max_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps))

    def on_epoch(stats: EpochStats) -> None:
        if not stats.partial:  # an epoch the step budget cut short is in the step_* curves instead
            curves.add_epoch(stats)

    def on_step(stats: StepStats) -> None:
        if uses_steps:
            curves.add_step(stats)
        if _worth_a_line(stats, cfg, time.perf_counter() - last_line[0]):
            logger.info(progress_line(stats))
            update_progress_artifact(progress, 100.0 * min(stats.step / max(stats.total_steps, 1), 1.0))
            last_line[0] = time.perf_counter()
        step_watch.notify(stats)  # a sweep's pruner, after the step is in the curves it keeps

    return TrainingHooks(
        on_epoch=on_epoch,
        on_step=on_step,
        # Metrics first: once a checkpoint exists, MLflow has every epoch up to it, so a resume leaves no gap.
        before_checkpoint=curves.flush,
        after_checkpoint=lambda path: run_checkpoints.upload_checkpoint(run_id, path),  # once verified on disk
        guard=runs.uninterrupted,
        # SIGINT or SIGTERM: a checkpoint at the next step boundary, then the run stops (deeprnn.training.stop_signals).
        stop_requested=stop_signals.requested,
    )


STOP_REASONS = {
    "epochs": "all epochs done",
    "max_steps": "the step budget (max_steps) is spent",
    "time_budget": "the time budget is spent",
    "early_stopping": "early stopping",
}


def _record_stop(run_id: str, outcome: TrainingOutcome, logger: Logger) -> None:
    """Why training ended, in the log and as MLflow tags (``deeprnn.stop_reason``, ``deeprnn.stop_detail``)."""
    if not outcome.stop_reason:
        return
    detail = outcome.stop_detail or STOP_REASONS.get(outcome.stop_reason, outcome.stop_reason)
    logger.info("training ended at step %s: %s", f"{outcome.steps_done:,}", detail)
    tags = {"deeprnn.stop_reason": outcome.stop_reason, "deeprnn.stop_detail": detail}
    runs.set_tags(run_id, {**tags, "deeprnn.stopped_at_step": outcome.steps_done})


@task(
    name="train-model",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=10,
    # Not after a timeout (past train.timeout_minutes; an OSError too): a retry would only run as long again.
    retry_condition_fn=store.retry_on_io_faults(TimeoutError),
)
def train_model(
    config: RunConfig, vocab: Vocab, splits: Splits, run_id: str, run_dir: str, device: torch.device
) -> TrainingOutcome:
    """Train on the training split, logging every epoch to MLflow; returns the checkpoint path and metrics.

    When the run folder already holds ``last.pt`` (a retry of this task, or ``deeprnn run --resume``),
    training continues from it instead of starting over. Stopped by SIGINT or SIGTERM (checkpointed at a
    step boundary), the task run ends Cancelled and returns that state: ``outcome`` raises the stop again.
    """
    try:
        return _train(config, vocab, splits, run_id, run_dir, device)
    except stop_signals.StopRequested as exc:
        # A stop is not a crash: Prefect's engine would end the task run Crashed on this KeyboardInterrupt
        # (which alerts) inside a flow run that ends Cancelled. Returned, the state is the task run's end state.
        return Cancelled(message=f"stopped by {exc.signal_name}")  # type: ignore[return-value]


def outcome(result: TrainingOutcome | State) -> TrainingOutcome:
    """What ``train_model`` returned; when a stop ended it (its task run Cancelled), the stop raised again for
    the stages around it: the MLflow run marked KILLED with its checkpoint, the flow run Cancelled."""
    if isinstance(result, State):
        raise stop_signals.StopRequested(stop_signals.requested() or signal.SIGINT)
    return result


def _train(
    config: RunConfig, vocab: Vocab, splits: Splits, run_id: str, run_dir: str, device: torch.device
) -> TrainingOutcome:
    """The task's body: training, with its progress in Prefect and MLflow."""
    logger = get_run_logger()
    run = start_training(config, vocab, splits, Path(run_dir), device)
    step = run.trainer.step
    if run.resumed:
        runs.set_tags(run_id, {"deeprnn.resumed_at_epoch": run.epochs_done, "deeprnn.resumed_at_step": step})
        logger.info("resuming from the checkpoint at epoch %d, step %d in %s", run.epochs_done, step, run.folder / LAST)
    logger.info(run.describe())
    earlier = metrics.epoch_history(run_id, run.epochs_done) if run.epochs_done else []  # the whole curve
    curves = metrics.MetricLogger(run_id, resuming=True)  # a retry or resume may find epochs already logged
    progress = create_progress_artifact(0.0, key=None, description="Training progress (% of steps)")
    started = time.perf_counter()
    try:
        # A stop signal is held back while training: the loop stops at its next step boundary, checkpointed.
        with metrics.system_metrics(run_id), stop_signals.held():  # CPU, memory (and GPU) use as system/* metrics
            trained = run.fit(_hooks(run_id, config.train, curves, progress, logger), earlier)
    except BaseException:
        try:
            curves.flush()  # whatever was measured reaches MLflow, also when training fails
        except Exception as exc:  # MLflow may be the fault: never hide the original error behind this one
            logger.warning("could not log the last metrics: %s: %s", type(exc).__name__, exc)
        raise
    curves.flush()
    update_progress_artifact(progress, 100.0)  # done: the budget or the epochs are spent
    _record_stop(run_id, trained, logger)
    logger.info(
        f"trained in {time.perf_counter() - started:.1f} s ({trained.step_mode} steps, {trained.precision}): "
        f"{trained.epochs_done} epochs, {trained.steps_done:,} steps, "
        f"final train ppl {trained.final_train_perplexity:.3f}, {trained.tokens_per_sec:,.0f} tokens/s"
    )
    return trained
