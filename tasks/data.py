"""Prefect tasks for the data stages: download, vocabulary, token ids and splits."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from deeprnn import tokenize
from deeprnn.batching import Splits, check_enough_tokens, split_corpus
from deeprnn.config import DataConfig, TrainConfig
from deeprnn.download import CorpusFile, TransientDownloadError, fetch_corpus, read_text_chunks
from deeprnn.vocab import Vocab


def _read_lines(corpus: CorpusFile) -> list[str]:
    """The corpus's preprocessed lines, read through ``read_text_chunks`` (so ``.gz`` and folders work too);
    the whole text is held here, as the vocabulary and split tasks need it today."""
    return tokenize.preprocess_lines("".join(read_text_chunks(corpus)))


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only network faults (timeouts, refused connections, 5xx), never 4xx or hash mismatches."""
    try:
        state.result()
    except TransientDownloadError:
        return True
    except Exception:
        return False
    return False


# The one retry layer for downloads (fetch_corpus itself makes one attempt) and no Prefect cache: the
# library's hash-checked cache is the one cache, checked on every run, so a deleted or corrupted copy is
# always fetched again and another DEEPRNN_CACHE_DIR never reuses this one's result.
@task(
    name="download-corpus",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 8],
    retry_condition_fn=_transient,
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


def _vocab_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Content-addressed: the corpus hash and the tokenization settings."""
    data: DataConfig = parameters["data"]
    corpus: CorpusFile = parameters["corpus"]
    settings = f"{corpus.sha1}|{data.token}|{data.min_freq}|{data.reserved_tokens}"
    return "vocab-" + hashlib.sha256(settings.encode()).hexdigest()


@task(name="build-vocab", cache_key_fn=_vocab_key, cache_expiration=timedelta(days=30))
def build_vocab(corpus: CorpusFile, data: DataConfig) -> dict[str, Any]:
    """Tokenize the whole book and build the vocabulary (returned as a JSON-ready dict)."""
    tokens = tokenize.flatten(tokenize.tokenize(_read_lines(corpus), data.token))
    vocab = Vocab(tokens, data.min_freq, data.reserved_tokens)
    get_run_logger().info("vocabulary: %d tokens from %d %ss", len(vocab), len(tokens), data.token)
    return vocab.to_dict()


@task(name="prepare-splits", cache_policy=NO_CACHE)
def prepare_splits(corpus: CorpusFile, vocab: dict[str, Any], data: DataConfig, train: TrainConfig) -> Splits:
    """Encode the corpus and cut train/validation/test; refuse a training part too short for one minibatch."""
    tokens = tokenize.flatten(tokenize.tokenize(_read_lines(corpus), data.token))
    ids = torch.tensor(Vocab.from_dict(vocab).encode(tokens), dtype=torch.long)
    splits = split_corpus(ids, data.val_fraction, data.test_fraction, data.max_tokens)
    check_enough_tokens(splits.train.numel(), train.batch_size, train.num_steps)
    get_run_logger().info(
        "tokens: %d train, %d validation, %d test", splits.train.numel(), splits.val.numel(), splits.test.numel()
    )
    return splits

