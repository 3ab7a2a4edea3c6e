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
