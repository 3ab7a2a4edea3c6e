"""Prefect tasks for the data stages: download, vocabulary, token ids and splits."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from deeprnn import tokenize
from deeprnn.batching import Splits, check_enough_tokens, split_corpus
from deeprnn.config import DataConfig, TrainConfig
from deeprnn.download import CorpusFile, TransientDownloadError, cached_copy, fetch_corpus, valid_cached_sha1
from deeprnn.vocab import Vocab


def _download_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Cache key = where the copy lives + source + expected hash + the hash of that copy, valid right now.

    Keying on the current bytes keeps Prefect's cross-run cache safe: a deleted or corrupted cached copy gets
    a key never seen before, so the task runs again and re-fetches instead of returning a stale path; and
    another cache folder (``DEEPRNN_CACHE_DIR``) never reuses this one's result.
    """
    source, expected = parameters["source"], parameters.get("expected_sha1")
    on_disk = valid_cached_sha1(source, expected)
    if on_disk is None:
        return f"download-{uuid.uuid4().hex}"  # nothing valid to reuse: always run
    copy = cached_copy(source, expected)
    return hashlib.sha256(f"{copy.resolve()}|{source}|{expected}|{on_disk}".encode()).hexdigest()


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only network faults (timeouts, refused connections, 5xx), never 4xx or hash mismatches."""
    try:
        state.result()
    except TransientDownloadError:
        return True
    except Exception:
        return False
    return False


@task(
    name="download-corpus",
    cache_key_fn=_download_key,
    cache_expiration=timedelta(days=30),
    retries=2,
    retry_delay_seconds=[2, 8],
    retry_condition_fn=_transient,
)
def download_corpus(source: str, expected_sha1: str | None) -> CorpusFile:
    """Fetch the corpus into the hash-checked cache (no network when the cache is valid)."""
    corpus = fetch_corpus(source, expected_sha1)
    get_run_logger().info("corpus %s: %d bytes, sha1 %s", corpus.source, corpus.num_bytes, corpus.sha1)
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
    tokens = tokenize.flatten(tokenize.tokenize(tokenize.read_lines(corpus.path), data.token))
    vocab = Vocab(tokens, data.min_freq, data.reserved_tokens)
    get_run_logger().info("vocabulary: %d tokens from %d %ss", len(vocab), len(tokens), data.token)
    return vocab.to_dict()


@task(name="prepare-splits", cache_policy=NO_CACHE)
def prepare_splits(corpus: CorpusFile, vocab: dict[str, Any], data: DataConfig, train: TrainConfig) -> Splits:
    """Encode the corpus and cut train/validation/test; refuse a training part too short for one minibatch."""
    tokens = tokenize.flatten(tokenize.tokenize(tokenize.read_lines(corpus.path), data.token))
    ids = torch.tensor(Vocab.from_dict(vocab).encode(tokens), dtype=torch.long)
    splits = split_corpus(ids, data.val_fraction, data.test_fraction, data.max_tokens)
    check_enough_tokens(splits.train.numel(), train.batch_size, train.num_steps)
    get_run_logger().info(
        "tokens: %d train, %d validation, %d test", splits.train.numel(), splits.val.numel(), splits.test.numel()
    )
    return splits

