"""The training stage as Prefect tasks: ``train-model``, one call into the library's training stage, with its
progress in Prefect (log lines, a progress artifact) and every epoch, step and checkpoint in MLflow; and
``prepare-resume``, which finds a run to continue, its last checkpoint and the configuration it continues with.

What else watches a run's progress, for the caller of the pipeline (a sweep trial's pruner): ``run_pipeline`` is
the same for every run, so a caller that needs every held-out measurement (an Optuna trial reporting to its
pruner) sets ``watching(observer)`` around it; the training task calls the observer from its ``on_step`` hook,
after the step is in the MLflow curves. An observer stops the run by raising ``TrialPruned``: the training task
flushes the curves and the exception reaches the caller.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from uuid import UUID

import torch
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled
from pydantic import BaseModel

from deeprnn.config import RunConfig, TrainConfig, overrides_dict
from deeprnn.data.batching import Splits
from deeprnn.data.vocab import Vocab
from deeprnn.ops import failures as ops_failures
from deeprnn.pipeline import TrainingHooks, TrainingOutcome, start_training
from deeprnn.tracking import metrics, run_checkpoints, runs, store
from deeprnn.tracking.run_checkpoints import CHECKPOINT_ARTIFACT
from deeprnn.training import checkpoint, resume, stop_signals
from deeprnn.training.progress import EpochStats, StepStats, progress_line
from deeprnn.training.resume import LAST

StepObserver = Callable[[StepStats], None]

# A context variable: a Dask worker runs several trials in threads, each with its own observer.
_observer: ContextVar[StepObserver] = ContextVar("deeprnn_step_observer", default=lambda stats: None)


class TrialPruned(Exception):
    """A sweep's pruner stopped this trial at ``step``: its held-out perplexity fell behind other trials'."""

    def __init__(self, step: int, value: float, reason: str) -> None:
        super().__init__(f"pruned at step {step:,} (held-out perplexity {value:.3f}): {reason}")
        self.step, self.value, self.reason = step, value, reason


@contextlib.contextmanager
def watching(observer: StepObserver) -> Iterator[None]:
    """Call ``observer`` with every progress report of the training run(s) started inside this block."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


_LOG_SECONDS = 30.0  # inside a long epoch, a progress line (and progress update) at most this often


def _hooks(run_id: str, cfg: TrainConfig, curves: metrics.MetricLogger, progress: UUID) -> TrainingHooks:
    """Every epoch and step to MLflow, a progress line and the progress artifact now and then, each checkpoint
    logged as an artifact; Ctrl-C is held back while they write, and raised when they are done."""
    logger, last_line = get_run_logger(), [time.perf_counter()]
    # A run that counts in steps (budget, evaluations or checkpoints) gets step_* curves in MLflow.
    uses_steps = any(v is not None for v in (cfg.max_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps))

    def on_epoch(stats: EpochStats) -> None:
        if not stats.partial:  # an epoch the step budget cut short is in the step_* curves instead
            curves.add_epoch(stats)

    def on_step(stats: StepStats) -> None:
        if uses_steps:
            curves.add_step(stats)
        # A line every ``log_every`` epochs, at the last epoch, at every held-out measurement, and at most every
        # ``_LOG_SECONDS`` inside a long epoch.
        ends = stats.epoch % cfg.log_every == 0 or stats.epoch == cfg.epochs or stats.step == stats.total_steps
        due = stats.heldout_perplexity is not None or time.perf_counter() - last_line[0] >= _LOG_SECONDS
        if (stats.epoch_end and ends) or due:
            logger.info(progress_line(stats))
            update_progress_artifact(progress, 100.0 * min(stats.step / max(stats.total_steps, 1), 1.0))
            last_line[0] = time.perf_counter()
        _observer.get()(stats)  # a sweep's pruner, after the step is in the curves it keeps; may raise TrialPruned

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
    step boundary), the task run ends Cancelled and returns that state: ``run_pipeline`` raises the stop again
    for the stages around it (the MLflow run marked KILLED with its checkpoint, the flow run Cancelled).
    """
    try:
        logger = get_run_logger()
        run = start_training(config, vocab, splits, Path(run_dir), device)
        step = run.trainer.step
        if run.resumed:
            runs.set_tags(run_id, {"deeprnn.resumed_at_epoch": run.epochs_done, "deeprnn.resumed_at_step": step})
            logger.info(
                "resuming from the checkpoint at epoch %d, step %d in %s", run.epochs_done, step, run.folder / LAST
            )
        logger.info(run.describe())
        earlier = metrics.epoch_history(run_id, run.epochs_done) if run.epochs_done else []  # the whole curve
        curves = metrics.MetricLogger(run_id, resuming=True)  # a retry or resume may find epochs already logged
        progress = create_progress_artifact(0.0, key=None, description="Training progress (% of steps)")
        started = time.perf_counter()
        try:
            # A stop signal is held back while training: the loop stops at its next step boundary, checkpointed.
            with metrics.system_metrics(run_id), stop_signals.held():  # CPU, memory (and GPU) use as system/* metrics
                trained = run.fit(_hooks(run_id, config.train, curves, progress), earlier)
        except BaseException:
            try:
                curves.flush()  # whatever was measured reaches MLflow, also when training fails
            except Exception as exc:  # MLflow may be the fault: never hide the original error behind this one
                logger.warning("could not log the last metrics: %s: %s", type(exc).__name__, exc)
            raise
        curves.flush()
        update_progress_artifact(progress, 100.0)  # done: the budget or the epochs are spent
        if trained.stop_reason:  # why training ended, in the log and as MLflow tags
            detail = trained.stop_detail or STOP_REASONS.get(trained.stop_reason, trained.stop_reason)
            logger.info("training ended at step %s: %s", f"{trained.steps_done:,}", detail)
            tags = {"deeprnn.stop_reason": trained.stop_reason, "deeprnn.stop_detail": detail}
            runs.set_tags(run_id, {**tags, "deeprnn.stopped_at_step": trained.steps_done})
        logger.info(
            f"trained in {time.perf_counter() - started:.1f} s ({trained.step_mode} steps, {trained.precision}): "
            f"{trained.epochs_done} epochs, {trained.steps_done:,} steps, "
            f"final train ppl {trained.final_train_perplexity:.3f}, {trained.tokens_per_sec:,.0f} tokens/s"
        )
        return trained
    except stop_signals.StopRequested as exc:
        # A stop is not a crash: Prefect's engine would end the task run Crashed on this KeyboardInterrupt
        # (which alerts) inside a flow run that ends Cancelled. Returned, the state is the task run's end state.
        return Cancelled(message=f"stopped by {exc.signal_name}")  # type: ignore[return-value]


@task(name="prepare-resume", cache_policy=NO_CACHE)
def prepare_resume(
    run_id: str,
    runs_dir: str,
    experiment: Optional[str],
    data: BaseModel | dict[str, Any] | None = None,
    model: BaseModel | dict[str, Any] | None = None,
    train: BaseModel | dict[str, Any] | None = None,
    sample: BaseModel | dict[str, Any] | None = None,
) -> tuple[RunConfig, str]:
    """Put the run's last checkpoint in its run folder (from MLflow if the local copy is gone) and return the
    configuration stored in it, with the allowed overrides applied, and the run's experiment.

    Refuses, before anything is changed: an id that is not a run here, an experiment other than the run's,
    overrides that contradict the checkpoint, and a FINISHED run that would have nothing left to train (its
    epochs, or the step or time budget it stopped on, not raised).
    """
    resume.check_run_id(run_id)
    store.check_reachable()
    run = runs.find_run(run_id)
    if experiment and experiment != run.experiment:
        raise resume.ResumeError(f"run {run_id} belongs to experiment {run.experiment!r}, not {experiment!r}")
    saved = _load_checkpoint(run_id, resume.run_folder(runs_dir, run_id) / resume.LAST, run.tags)
    state = saved.get("trainer_state") or {}
    steps, seconds = int(state.get("step") or 0), float(state.get("train_seconds") or 0.0)
    overrides = overrides_dict(data, model, train, sample)
    config = resume.resume_config(saved["config"], overrides, saved["epoch"], steps, seconds)
    if run.status == "FINISHED":
        stored = RunConfig.model_validate(saved["config"]).train
        done = resume.Finished(run.tags.get("deeprnn.stop_reason", ""), saved["epoch"], steps, stored.time_budget)
        left = config.train
        if refusal := resume.nothing_left(run_id, done, left.epochs, left.max_steps, left.time_budget):
            raise resume.ResumeError(refusal)
    get_run_logger().info("checkpoint at epoch %d; continuing to epoch %d", saved["epoch"], config.train.epochs)
    return config, run.experiment


def _load_checkpoint(run_id: str, last: Path, tags: dict[str, str]) -> dict[str, Any]:
    """The run's last checkpoint: the local file when it matches its digest, else the MLflow copy (which then
    replaces it). A run with neither is refused in one line (``ResumeError``) that says, from the run's
    ``tags``, whether it never logged one or its files are gone."""
    logger = get_run_logger()
    damaged: ValueError | None = None
    if last.is_file():
        try:
            saved = checkpoint.load(last)  # digest checked; weights only: a tampered file runs no code
        except ValueError as exc:
            damaged = exc
            logger.warning("%s; taking the MLflow copy (%s) instead", exc, CHECKPOINT_ARTIFACT)
        else:
            logger.info("resuming MLflow run %s from %s", run_id, last)
            return saved
    else:
        logger.info("no local checkpoint at %s: fetching %s from the MLflow run", last, CHECKPOINT_ARTIFACT)
    try:
        return run_checkpoints.fetch_checkpoint(run_id, last)
    except FileNotFoundError:
        if damaged is not None:  # its own kind (a refused pickle stays one), saying that MLflow has no copy
            kind = type(damaged) if ops_failures.is_expected(damaged) else resume.ResumeError
            raise kind(f"{damaged}, and MLflow run {run_id} has no copy of it") from None
        raise resume.ResumeError(resume.no_checkpoint(run_id, tags, last)) from None
