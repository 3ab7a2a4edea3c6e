"""Prefect tasks for training, evaluation and generation. Models stay out of Prefect's results: tasks
take and return checkpoint paths, metrics and text."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from deeprnn import checkpoint, resume
from deeprnn.batching import Splits
from deeprnn.config import RunConfig, SampleConfig
from deeprnn.device import describe, resolve_device, seed_everything
from deeprnn.evaluate import perplexity
from deeprnn.generate import generate_batch
from deeprnn.model import RNNLM
from deeprnn.train import EpochStats, Trainer
from deeprnn.vocab import Vocab
from tasks import tracking

LAST = "last.pt"  # resumable: weights + optimizer + RNG state, rewritten every checkpoint
MODEL = "model.pt"  # the selected weights the run reports and logs


def _progress_line(s: EpochStats, epochs: int) -> str:
    held = f", held-out ppl {s.heldout_perplexity:.2f}" if s.heldout_perplexity is not None else ""
    return f"epoch {s.epoch}/{epochs}: train ppl {s.train_perplexity:.3f}{held}, {s.tokens_per_sec:,.0f} tokens/s"


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O and tracking faults (disk, network, MLflow), never divergence or bad settings: those would
    fail the same way again."""
    try:
        state.result()
    except OSError:
        return True
    except Exception as exc:
        return tracking.is_tracking_error(exc)
    return False


@task(
    name="train-model",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=_worth_retrying,
)
def train_model(
    config: RunConfig, vocab: dict[str, Any], splits: Splits, run_id: str, run_dir: str
) -> dict[str, Any]:
    """Train on the training split, logging every epoch to MLflow; returns the checkpoint path and metrics.

    When the run folder already holds ``last.pt`` (a retry of this task, or ``deeprnn run --resume``),
    training continues from it instead of starting over.
    """
    logger = get_run_logger()
    cfg = config.train
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    voc = Vocab.from_dict(vocab)
    model = RNNLM.from_config(len(voc), config.model)
    has_val = splits.val.numel() > 0
    heldout = splits.val if has_val else splits.test
    trainer = Trainer(model, splits.train, cfg, device, heldout_ids=heldout, select_best=has_val)
    out = Path(run_dir)
    done = resume.restore_training(checkpoint.load(out / LAST), config, model, trainer) if (out / LAST).is_file() else 0
    earlier = tracking.epoch_history(run_id, done) if done else []
    if done:
        tracking.set_tags(run_id, {"deeprnn.resumed_at_epoch": done})
        logger.info("resuming from the checkpoint of epoch %d in %s", done, out / LAST)
    logger.info(
        "training %s x%d (%d hidden) on %s: %d epochs of %d tokens, held-out = %s split",
        config.model.cell, config.model.num_layers, config.model.num_hiddens, describe(device),
        cfg.epochs, splits.train.numel(), "validation" if has_val else "test",
    )

    metrics = tracking.MetricLogger(run_id, resuming=True)  # a retry or resume may find epochs already logged
    progress = create_progress_artifact(0.0, key=None, description="Training progress (% of epochs)")
    started = time.perf_counter()

    # Ctrl-C is held back while the callbacks write to MLflow and Prefect, and raised when they are done.
    def on_epoch(stats: EpochStats) -> None:
        with tracking.uninterrupted():
            metrics.add_epoch(stats)
            if stats.epoch % cfg.log_every == 0 or stats.epoch == cfg.epochs:
                logger.info(_progress_line(stats, cfg.epochs))
                update_progress_artifact(progress, 100.0 * stats.epoch / cfg.epochs)

    def on_checkpoint(epoch: int) -> None:
        with tracking.uninterrupted():
            # Metrics first: once a checkpoint exists, MLflow has every epoch up to it, so a resume leaves no gap.
            metrics.flush()
            payload = checkpoint.make_payload(config, voc, model, epoch=epoch, trainer_state=trainer.state_dict())
            path = checkpoint.save(out / LAST, payload)
            tracking.log_artifact(run_id, path, "checkpoints")

    fit_started = time.time()  # wall clock, so a benchmark can split a run into overhead and training
    try:
        with tracking.system_metrics(run_id):  # CPU, memory (and GPU) use as system/* metrics
            result = trainer.fit(on_epoch=on_epoch, on_checkpoint=on_checkpoint, checkpoint_every=cfg.checkpoint_every)
    except BaseException:
        try:
            metrics.flush()  # whatever was measured reaches MLflow, also when training fails
        except Exception as exc:  # MLflow may be the fault: never hide the original error behind this one
            logger.warning("could not log the last metrics: %s: %s", type(exc).__name__, exc)
        raise
    metrics.flush()
    fit_finished = time.time()
    final = checkpoint.save(out / MODEL, checkpoint.make_payload(config, voc, model, epoch=result.epochs_done))
    history = earlier + result.history  # the whole curve, also after a resume
    summary = result.to_dict()
    summary.pop("history")
    if history:
        summary["final_train_perplexity"] = history[-1].train_perplexity
    logger.info(
        f"trained in {time.perf_counter() - started:.1f} s ({result.step_mode} steps, {result.precision}): "
        f"final train ppl {summary['final_train_perplexity']:.3f}, {result.tokens_per_sec:,.0f} tokens/s"
    )
    summary.update(fit_started_at=fit_started, fit_finished_at=fit_finished)
    return {"checkpoint": str(final), "device": describe(device), "history": [vars(h) for h in history], **summary}


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model(checkpoint_path: str, splits: Splits, device: str) -> dict[str, float | None]:
    """Perplexity of the selected model on each split (eval mode, token-weighted)."""
    model, _, config = checkpoint.restore_model(checkpoint.load(Path(checkpoint_path)), resolve_device(device))
    rows = config.train.batch_size
    result = {
        "train_perplexity_eval": perplexity(model, splits.train, rows=rows),
        "val_perplexity": perplexity(model, splits.val, rows=rows) if splits.val.numel() > 1 else None,
        "test_perplexity": perplexity(model, splits.test, rows=rows),
    }
    get_run_logger().info(
        "evaluation: %s", ", ".join(f"{k} {v:.3f}" for k, v in result.items() if v is not None)
    )
    return result


@task(name="generate-samples", cache_policy=NO_CACHE)
def generate_samples(checkpoint_path: str, device: str, sample: SampleConfig | None = None) -> dict[str, str]:
    """Continue each prefix with the selected model (greedy unless a temperature is set); ``sample`` replaces
    the checkpoint's own sample settings."""
    model, voc, config = checkpoint.restore_model(checkpoint.load(Path(checkpoint_path)), resolve_device(device))
    s = sample or config.sample
    # All prefixes as one batch: one forward step per generated token for all of them.
    texts = generate_batch(
        model, voc, s.prefixes, s.num_chars, token=config.data.token, temperature=s.temperature, top_k=s.top_k, seed=s.seed
    )
    samples = dict(zip(s.prefixes, texts))
    logger = get_run_logger()
    for text in samples.values():
        logger.info("sample: %s", text)
    return samples
