"""The stages composed once, as plain functions with typed results:

    corpus (download) -> prepared tokens + vocabulary -> splits -> model + trainer -> fit -> evaluation

Training runs in a run folder (``start_training``): it continues from the folder's resumable ``last.pt``
when there is one, rewrites it at every checkpoint and saves the selected weights as ``model.pt``; the
layer above plugs its logging and tracking in through ``TrainingHooks``.

The Prefect tasks (``tasks/``) are each one call into these or into the stage's own module (``download-corpus``
calls ``fetch_corpus``, ``prepare-tokens`` calls ``prepare``). The training flow and a sweep's trials chain the
tasks in this order through ``deeprnn.tasks.pipeline_tasks.run_pipeline``; the evaluation flow chains download,
prepare and splits itself (a logged model's corpus, checked against the model's vocabulary), the prepare flow
the first two. The benchmarks and tests call the functions here directly.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager

import torch

from deeprnn.config import DataConfig, RunConfig, TrainConfig
from deeprnn.data.batching import Splits, check_enough_tokens, split_corpus
from deeprnn.data.download import CorpusFile, fetch_corpus
from deeprnn.data.prepare import PreparedCorpus, PrepareError, prepare
from deeprnn.data.vocab import Vocab
from deeprnn.device import describe, resolve_device, seed_everything
from deeprnn.durations import format_duration
from deeprnn.evaluate import perplexity
from deeprnn.model import RNNLM
from deeprnn.training import checkpoint
from deeprnn.training.divergence import check_weights
from deeprnn.training.loop import Trainer
from deeprnn.training.progress import EpochStats, FitSummary, StepStats
from deeprnn.training.resume import LAST, MODEL, restore_training
from deeprnn.training.stop_signals import StopRequested


@dataclass(frozen=True)
class Data:
    """What the data stages hand to training: the corpus, its prepared tokens and vocabulary, the splits."""

    corpus: CorpusFile
    prepared: PreparedCorpus
    vocab: Vocab
    splits: Splits


@dataclass(frozen=True, kw_only=True)
class TrainingOutcome(FitSummary):
    """What the training stage hands on: where the selected weights are, where they trained, and how (the
    ``FitSummary`` of the whole run: its history also holds the epochs before a resume)."""

    checkpoint: str  # the selected weights (a checkpoint without trainer state)
    device: str  # described, e.g. "cuda:0 (NVIDIA H200)"
    fit_started_at: float  # wall clock (time.time()), for the pipeline benchmark's phases
    fit_finished_at: float

    def metrics(self) -> dict[str, float | None]:
        """The run's final training metrics, as MLflow records them (the speed as ``mean_tokens_per_sec``)."""
        names = ("final_train_perplexity", "best_heldout_perplexity", "best_epoch", "train_seconds", "tokens_per_sec")
        mlflow_names = {"tokens_per_sec": "mean_tokens_per_sec"}
        return {mlflow_names.get(n, n): getattr(self, n) for n in (*names, "steps_done", "best_step", "evaluations")}


@dataclass(frozen=True)
class Evaluation:
    """Perplexities of a trained model on each split, and how many tokens each held-out one read."""

    train_perplexity_eval: float
    val_perplexity: float | None
    test_perplexity: float
    val_tokens: int | None
    test_tokens: int

    def metrics(self) -> dict[str, float | None]:
        """As MLflow metrics, one per field (None where there is no validation split)."""
        return asdict(self)


def load_data(config: RunConfig, cache: Path | None = None) -> Data:
    """Fetch the corpus, prepare its tokens (from the token cache when it has them) and cut the splits."""
    corpus = fetch_corpus(config.data.url, config.data.expected_sha1(), cache=cache)
    prepared = prepare(corpus, config.data, cache)
    return Data(corpus, prepared, prepared.vocab(), make_splits(prepared, config.data, config.train))


def make_splits(prepared: PreparedCorpus, data: DataConfig, train: TrainConfig, vocab: Vocab | None = None) -> Splits:
    """The prepared ids cut into train/validation/test (views of the memory map, nothing copied).

    Refuses a training part too short for one minibatch, and, with ``vocab`` (a model's), ids made with
    another vocabulary: they would not be the text that model was trained on.
    """
    if vocab is not None and vocab.idx_to_token != prepared.vocab().idx_to_token:
        raise PrepareError(
            "the corpus now tokenizes to another vocabulary than the model's: it is not the text the model "
            "was trained on (check the corpus URL and its SHA-1)"
        )
    ids = torch.from_numpy(prepared.ids())  # (N,) in the cache's small integer type
    splits = split_corpus(ids, data.val_fraction, data.test_fraction, data.max_tokens)
    check_enough_tokens(splits.train.numel(), train.batch_size, train.num_steps)
    return splits


def build_trainer(config: RunConfig, vocab_size: int, splits: Splits, device: torch.device | None = None) -> Trainer:
    """The seeded model and its trainer on ``device`` (default: the configured one, resolved here). The
    held-out text is the validation split when there is one (and the best epoch on it is kept), else the test
    split (the last epoch is kept)."""
    device = resolve_device(config.train.device) if device is None else device
    seed_everything(config.train.seed)
    model = RNNLM.from_config(vocab_size, config.model)
    has_val = splits.val.numel() > 0
    heldout = splits.val if has_val else splits.test
    return Trainer(model, splits.train, config.train, device, heldout_ids=heldout, select_best=has_val)


def _no_hook(*_: object) -> None:
    """A hook left out: nothing to do."""


@dataclass
class TrainingHooks:
    """What the layer above does while the training stage runs; every hook is optional."""

    on_epoch: Callable[[EpochStats], None] = _no_hook  # every epoch, in order, a few at a time
    on_step: Callable[[StepStats], None] | None = None  # every read-back, also inside long epochs
    before_checkpoint: Callable[[], None] = _no_hook  # e.g. flush metrics: a checkpoint never runs ahead of them
    after_checkpoint: Callable[[Path], None] = _no_hook  # the resumable checkpoint just written
    # The context every hook (and each checkpoint with its two hooks) runs in, e.g. one holding Ctrl-C back.
    guard: Callable[[], ContextManager[object]] = contextlib.nullcontext
    # Polled at every step boundary the loop reports from: a signal number there ends training with a
    # checkpoint and ``StopRequested`` (``deeprnn.training.stop_signals``).
    stop_requested: Callable[[], int | None] = _no_hook


@dataclass
class TrainingRun:
    """The training stage of one run: its trainer in the run folder, fresh or continued from ``last.pt``."""

    config: RunConfig
    vocab: Vocab
    splits: Splits
    trainer: Trainer
    folder: Path
    epochs_done: int  # when the stage started: from the checkpoint, 0 for a fresh run

    @property
    def resumed(self) -> bool:
        """Whether training continues from a checkpoint (whole epochs, or steps inside the first one)."""
        return self.epochs_done > 0 or self.trainer.step > 0

    def describe(self) -> str:
        """One line: the model, the device, the epochs (and step budget), and the held-out split it evaluates."""
        m, cfg, has_val = self.config.model, self.config.train, self.trainer.select_best
        heldout = self.splits.val if has_val else self.splits.test
        budget = f" or {cfg.max_steps:,} steps" if cfg.max_steps is not None else ""
        if cfg.time_budget is not None:
            budget += f" or {format_duration(cfg.time_budget)} of training"
        capped = cfg.eval_max_tokens is not None and cfg.eval_max_tokens < heldout.numel()
        per_evaluation = f" (its first {cfg.eval_max_tokens:,} tokens per evaluation)" if capped else ""
        return (
            f"training {m.cell} x{m.num_layers} ({m.num_hiddens} hidden) on {describe(self.trainer.device)}: "
            f"{cfg.epochs} epochs{budget} of {self.splits.train.numel()} tokens, "
            f"held-out = {'validation' if has_val else 'test'} split{per_evaluation}"
        )

    def fit(self, hooks: TrainingHooks, earlier: list[EpochStats] | None = None) -> TrainingOutcome:
        """Train to the configured epochs or step budget, checkpointing into ``last.pt`` as configured and at
        the end, then save the selected weights as ``model.pt``. ``earlier``: the epochs before a resume, which
        the outcome's history continues."""
        trainer, guard = self.trainer, hooks.guard
        payload = partial(checkpoint.make_payload, self.config, self.vocab, trainer.model)  # a checkpoint's dict

        def on_checkpoint(epoch: int) -> None:
            with guard():
                hooks.before_checkpoint()
                # ``epoch`` counts whole epochs; a checkpoint inside the next one carries its position.
                state = payload(epoch=epoch, trainer_state=trainer.state_dict())
                hooks.after_checkpoint(checkpoint.save(self.folder / LAST, state))

        def on_epoch(stats: EpochStats) -> None:
            with guard():
                hooks.on_epoch(stats)

        def on_step(stats: StepStats) -> None:
            # The loop reports at every step boundary where its state is whole: the end of an epoch, or inside
            # one at least every few seconds. A stop requested there checkpoints it (resuming from the next
            # minibatch) and raises ``StopRequested``.
            if hooks.on_step is not None:
                with guard():
                    hooks.on_step(stats)
            signum = hooks.stop_requested()
            if signum is not None:
                check_weights(trainer.train_step.params, stats.epoch)  # never save NaN weights
                on_checkpoint(trainer.epoch)
                raise StopRequested(signum)

        started = time.time()  # wall clock, so a benchmark can split a run into overhead and training
        result = trainer.fit(
            on_epoch=on_epoch,
            on_checkpoint=on_checkpoint,
            checkpoint_every=self.config.train.checkpoint_every,
            on_step=on_step,
            stop_requested=hooks.stop_requested,  # a report (and so the stop) at the very next step boundary
        )
        finished = time.time()
        final = checkpoint.save(self.folder / MODEL, payload(epoch=result.epochs_done))
        history = (earlier or []) + result.history  # the whole run's: a resume's continues the earlier epochs
        summary = {f.name: getattr(result, f.name) for f in fields(FitSummary)} | {"history": history}
        if history:
            summary["final_train_perplexity"] = history[-1].train_perplexity
        device = describe(trainer.device)
        return TrainingOutcome(
            **summary, checkpoint=str(final), device=device, fit_started_at=started, fit_finished_at=finished
        )


def start_training(
    config: RunConfig, vocab: Vocab, splits: Splits, run_dir: Path, device: torch.device | None = None
) -> TrainingRun:
    """The training stage in ``run_dir``: a fresh trainer, or (the folder holds ``last.pt``: a retry, or a
    resumed run) one continuing from that checkpoint, which must belong to this configuration. ``device``:
    the one the caller resolved (default: the configured one)."""
    trainer = build_trainer(config, len(vocab), splits, device)
    last = run_dir / LAST
    done = restore_training(checkpoint.load(last), config, trainer.model, trainer) if last.is_file() else 0
    return TrainingRun(config, vocab, splits, trainer, run_dir, done)


def evaluate_splits(model: RNNLM, splits: Splits, train: TrainConfig) -> Evaluation:
    """Perplexity of ``model`` on each split. The training split is read up to ``eval_max_tokens`` (a
    diagnostic); the held-out splits up to ``final_eval_max_tokens``, whole by default."""
    rows = train.batch_size
    val, test = splits.val[: train.final_eval_max_tokens], splits.test[: train.final_eval_max_tokens]  # None: whole
    has_val = val.numel() > 1
    return Evaluation(
        train_perplexity_eval=perplexity(model, splits.train[: train.eval_max_tokens], rows=rows),
        val_perplexity=perplexity(model, val, rows=rows) if has_val else None,
        test_perplexity=perplexity(model, test, rows=rows),
        val_tokens=val.numel() if has_val else None,
        test_tokens=test.numel(),
    )
