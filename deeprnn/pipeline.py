"""The stages composed once, as plain functions with typed results:

    corpus (download) -> prepared tokens + vocabulary -> splits -> model + trainer -> fit -> evaluation

The Prefect tasks (``tasks/``) are each one call into these, and the benchmarks and tests call them
directly, so nothing re-wires the stages by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deeprnn.batching import Splits, check_enough_tokens, split_corpus
from deeprnn.config import DataConfig, RunConfig, TrainConfig
from deeprnn.device import resolve_device, seed_everything
from deeprnn.download import CorpusFile, fetch_corpus
from deeprnn.evaluate import perplexity
from deeprnn.model import RNNLM
from deeprnn.prepare import PreparedCorpus, PrepareError, prepare
from deeprnn.progress import EpochStats, FitResult
from deeprnn.train import Trainer
from deeprnn.vocab import Vocab


@dataclass(frozen=True)
class Data:
    """What the data stages hand to training: the corpus, its prepared tokens and vocabulary, the splits."""

    corpus: CorpusFile
    prepared: PreparedCorpus
    vocab: Vocab
    splits: Splits


@dataclass(frozen=True)
class TrainingOutcome:
    """What the training stage hands on: where the selected weights are, where they trained, and how."""

    checkpoint: str  # the selected weights (a checkpoint without trainer state)
    device: str  # described, e.g. "cuda:0 (NVIDIA H200)"
    history: list[EpochStats]  # every epoch, also those before a resume
    epochs_done: int
    steps_done: int
    final_train_perplexity: float
    best_epoch: int | None
    best_heldout_perplexity: float | None
    train_seconds: float
    tokens_per_sec: float
    step_mode: str  # 'cuda-graph' or 'eager'
    precision: str  # 'bf16' or 'fp32'
    fit_started_at: float  # wall clock (time.time()), for the pipeline benchmark's phases
    fit_finished_at: float

    @classmethod
    def of(
        cls, fit: FitResult, earlier: list[EpochStats], checkpoint: str, device: str, started: float, finished: float
    ) -> "TrainingOutcome":
        """The outcome of ``fit``, continuing the ``earlier`` epochs of a resumed run."""
        history = earlier + fit.history
        return cls(
            checkpoint=checkpoint,
            device=device,
            history=history,
            epochs_done=fit.epochs_done,
            steps_done=fit.steps_done,
            final_train_perplexity=history[-1].train_perplexity if history else fit.final_train_perplexity,
            best_epoch=fit.best_epoch,
            best_heldout_perplexity=fit.best_heldout_perplexity,
            train_seconds=fit.train_seconds,
            tokens_per_sec=fit.tokens_per_sec,
            step_mode=fit.step_mode,
            precision=fit.precision,
            fit_started_at=started,
            fit_finished_at=finished,
        )

    def metrics(self) -> dict[str, float | None]:
        """The run's final training metrics, as MLflow records them."""
        return {
            "final_train_perplexity": self.final_train_perplexity,
            "best_heldout_perplexity": self.best_heldout_perplexity,
            "best_epoch": self.best_epoch,
            "train_seconds": self.train_seconds,
            "mean_tokens_per_sec": self.tokens_per_sec,
            "steps_done": self.steps_done,
        }


@dataclass(frozen=True)
class Evaluation:
    """Perplexities of a trained model on each split, and how many tokens each held-out one read."""

    train_perplexity_eval: float
    val_perplexity: float | None
    test_perplexity: float
    val_tokens: int | None
    test_tokens: int

    def metrics(self) -> dict[str, float | None]:
        """As MLflow metrics (None where there is no validation split)."""
        return {
            "train_perplexity_eval": self.train_perplexity_eval,
            "val_perplexity": self.val_perplexity,
            "test_perplexity": self.test_perplexity,
            "val_tokens": self.val_tokens,
            "test_tokens": self.test_tokens,
        }


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


def build_trainer(config: RunConfig, vocab_size: int, splits: Splits) -> Trainer:
    """The seeded model and its trainer on the configured device. The held-out text is the validation split
    when there is one (and the best epoch on it is kept), else the test split (the last epoch is kept)."""
    device = resolve_device(config.train.device)
    seed_everything(config.train.seed)
    model = RNNLM.from_config(vocab_size, config.model)
    has_val = splits.val.numel() > 0
    heldout = splits.val if has_val else splits.test
    return Trainer(model, splits.train, config.train, device, heldout_ids=heldout, select_best=has_val)


def evaluate_splits(model: RNNLM, splits: Splits, train: TrainConfig) -> Evaluation:
    """Perplexity of ``model`` on each split. The training split is read up to ``eval_max_tokens`` (a
    diagnostic); the held-out splits up to ``final_eval_max_tokens``, whole by default."""
    rows = train.batch_size
    train_ids = splits.train[: train.eval_max_tokens] if train.eval_max_tokens else splits.train
    val = splits.val[: train.final_eval_max_tokens] if train.final_eval_max_tokens else splits.val
    test = splits.test[: train.final_eval_max_tokens] if train.final_eval_max_tokens else splits.test
    has_val = val.numel() > 1
    return Evaluation(
        train_perplexity_eval=perplexity(model, train_ids, rows=rows),
        val_perplexity=perplexity(model, val, rows=rows) if has_val else None,
        test_perplexity=perplexity(model, test, rows=rows),
        val_tokens=val.numel() if has_val else None,
        test_tokens=test.numel(),
    )
