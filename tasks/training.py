"""Prefect tasks for training, evaluation and generation. Models stay out of Prefect's results: tasks
take and return checkpoint paths, metrics and text."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from deeprnn import checkpoint, resume
from deeprnn.batching import Splits
from deeprnn.config import RunConfig, SampleConfig, TrainConfig
from deeprnn.device import describe, resolve_device
from deeprnn.generate import generate_batch
from deeprnn.pipeline import Evaluation, TrainingOutcome, build_trainer, evaluate_splits
from deeprnn.progress import StepStats, progress_line
from deeprnn.train import EpochStats
from deeprnn.vocab import Vocab
from tracking import metrics, runs, store

LAST = "last.pt"  # resumable: weights + optimizer + RNG state, rewritten every checkpoint
MODEL = "model.pt"  # the selected weights the run reports and logs


_LOG_SECONDS = 30.0  # inside a long epoch, a progress line (and progress update) at most this often


def _uses_steps(cfg: TrainConfig) -> bool:
    """Whether the run counts in steps (budget, evaluations or checkpoints), so MLflow gets step_* curves."""
    return any(v is not None for v in (cfg.max_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps))


def _worth_a_line(s: StepStats, cfg: TrainConfig, seconds_since_last: float) -> bool:
    """Log every ``log_every`` epochs, the last epoch, every held-out measurement, and at most every
    ``_LOG_SECONDS`` inside a long epoch."""
    if s.epoch_end and (s.epoch % cfg.log_every == 0 or s.epoch == cfg.epochs or s.step == s.total_steps):
        return True
    return s.heldout_perplexity is not None or seconds_since_last >= _LOG_SECONDS


@task(
    name="train-model",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=10,
    # Not after a timeout (past train.timeout_minutes; an OSError too): a retry would only run as long again.
    retry_condition_fn=store.retry_on_io_faults(TimeoutError),
)
def train_model(config: RunConfig, vocab: dict[str, Any], splits: Splits, run_id: str, run_dir: str) -> TrainingOutcome:
    """Train on the training split, logging every epoch to MLflow; returns the checkpoint path and metrics.

    When the run folder already holds ``last.pt`` (a retry of this task, or ``deeprnn run --resume``),
    training continues from it instead of starting over.
    """
    logger = get_run_logger()
    cfg = config.train
    voc = Vocab.from_dict(vocab)
    trainer = build_trainer(config, len(voc), splits)
    model, device, has_val = trainer.model, trainer.device, trainer.select_best
    heldout = splits.val if has_val else splits.test
    out = Path(run_dir)
    done = resume.restore_training(checkpoint.load(out / LAST), config, model, trainer) if (out / LAST).is_file() else 0
    earlier = metrics.epoch_history(run_id, done) if done else []
    if done or trainer.step:
        runs.set_tags(run_id, {"deeprnn.resumed_at_epoch": done, "deeprnn.resumed_at_step": trainer.step})
        logger.info("resuming from the checkpoint at epoch %d, step %d in %s", done, trainer.step, out / LAST)
    budget = f" or {cfg.max_steps:,} steps" if cfg.max_steps is not None else ""
    logger.info(
        "training %s x%d (%d hidden) on %s: %d epochs%s of %d tokens, held-out = %s split%s",
        config.model.cell,
        config.model.num_layers,
        config.model.num_hiddens,
        describe(device),
        cfg.epochs,
        budget,
        splits.train.numel(),
        "validation" if has_val else "test",
        f" (its first {cfg.eval_max_tokens:,} tokens per evaluation)"
        if cfg.eval_max_tokens is not None and cfg.eval_max_tokens < heldout.numel()
        else "",
    )

    curves = metrics.MetricLogger(run_id, resuming=True)  # a retry or resume may find epochs already logged
    progress = create_progress_artifact(0.0, key=None, description="Training progress (% of steps)")
    started = time.perf_counter()
    last_line = [started]

    # Ctrl-C is held back while the callbacks write to MLflow and Prefect, and raised when they are done.
    def on_epoch(stats: EpochStats) -> None:
        if not stats.partial:  # an epoch the step budget cut short is in the step_* curves instead
            with runs.uninterrupted():
                curves.add_epoch(stats)

    def on_step(stats: StepStats) -> None:
        with runs.uninterrupted():
            if _uses_steps(cfg):
                curves.add_step(stats)
            if _worth_a_line(stats, cfg, time.perf_counter() - last_line[0]):
                logger.info(progress_line(stats))
                update_progress_artifact(progress, 100.0 * min(stats.step / max(stats.total_steps, 1), 1.0))
                last_line[0] = time.perf_counter()

    def on_checkpoint(epoch: int) -> None:
        with runs.uninterrupted():
            # Metrics first: once a checkpoint exists, MLflow has every epoch up to it, so a resume leaves no gap.
            curves.flush()
            # ``epoch`` counts whole epochs; a checkpoint inside the next one carries its position in trainer_state.
            payload = checkpoint.make_payload(config, voc, model, epoch=epoch, trainer_state=trainer.state_dict())
            path = checkpoint.save(out / LAST, payload)
            MlflowClient().log_artifact(run_id, str(path), "checkpoints")

    fit_started = time.time()  # wall clock, so a benchmark can split a run into overhead and training
    try:
        with metrics.system_metrics(run_id):  # CPU, memory (and GPU) use as system/* metrics
            result = trainer.fit(
                on_epoch=on_epoch, on_checkpoint=on_checkpoint, checkpoint_every=cfg.checkpoint_every, on_step=on_step
            )
    except BaseException:
        try:
            curves.flush()  # whatever was measured reaches MLflow, also when training fails
        except Exception as exc:  # MLflow may be the fault: never hide the original error behind this one
            logger.warning("could not log the last metrics: %s: %s", type(exc).__name__, exc)
        raise
    curves.flush()
    update_progress_artifact(progress, 100.0)  # done: the budget or the epochs are spent
    fit_finished = time.time()
    final = checkpoint.save(out / MODEL, checkpoint.make_payload(config, voc, model, epoch=result.epochs_done))
    # The whole curve, also after a resume.
    outcome = TrainingOutcome.of(result, earlier, str(final), describe(device), fit_started, fit_finished)
    logger.info(
        f"trained in {time.perf_counter() - started:.1f} s ({result.step_mode} steps, {result.precision}): "
        f"{result.epochs_done} epochs, {result.steps_done:,} steps, "
        f"final train ppl {outcome.final_train_perplexity:.3f}, {result.tokens_per_sec:,.0f} tokens/s"
    )
    return outcome


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(checkpoint_path: str, splits: Splits, device: str) -> Evaluation:
    """Perplexity of the selected model on each split (eval mode, token-weighted)."""
    model, _, config = checkpoint.restore_model(checkpoint.load(Path(checkpoint_path)), resolve_device(device))
    result = evaluate_splits(model, splits, config.train)
    shown = [f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in result.metrics().items() if v]
    get_run_logger().info("evaluation: %s", ", ".join(shown))
    return result


@task(name="generate-samples", cache_policy=NO_CACHE)
def generate_samples(checkpoint_path: str, device: str, sample: SampleConfig | None = None) -> dict[str, str]:
    """Continue each prefix with the selected model (greedy unless a temperature is set); ``sample`` replaces
    the checkpoint's own sample settings."""
    model, voc, config = checkpoint.restore_model(checkpoint.load(Path(checkpoint_path)), resolve_device(device))
    s = sample or config.sample
    # All prefixes as one batch: one forward step per generated token for all of them.
    texts = generate_batch(
        model,
        voc,
        s.prefixes,
        s.num_chars,
        token=config.data.token,
        temperature=s.temperature,
        top_k=s.top_k,
        seed=s.seed,
    )
    samples = dict(zip(s.prefixes, texts))
    logger = get_run_logger()
    for text in samples.values():
        logger.info("sample: %s", text)
    return samples
