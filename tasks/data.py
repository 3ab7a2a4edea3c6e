"""Prefect tasks for the data stages: download, prepared token ids and vocabulary (cached), splits."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from deeprnn.batching import Splits, check_enough_tokens, split_corpus
from deeprnn.config import DataConfig, TrainConfig
from deeprnn.download import CorpusFile, TransientDownloadError, cached_copy, fetch_corpus, valid_cached_sha1
from deeprnn.prepare import PreparedCorpus, PrepareError, dropped_letters_warning, prepare, prepared_summary


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


@task(name="prepare-tokens", cache_policy=NO_CACHE)
def prepare_tokens(corpus: CorpusFile, data: DataConfig) -> PreparedCorpus:
    """Tokenize the corpus once into the token cache, or find it there (then nothing is tokenized again)."""
    prepared = prepare(corpus, data)
    logger = get_run_logger()
    logger.info(prepared_summary(prepared))
    warning = dropped_letters_warning(prepared)
    if warning:
        logger.warning(warning)
    return prepared


@task(name="prepare-splits", cache_policy=NO_CACHE)
def prepare_splits(
    prepared: PreparedCorpus, data: DataConfig, train: TrainConfig, vocab: dict[str, Any] | None = None
) -> Splits:
    """Cut the cached token ids into train/validation/test (views of the memory map, nothing copied); refuse a
    training part too short for one minibatch, and ids made with another vocabulary than ``vocab``."""
    if vocab is not None and vocab["idx_to_token"] != prepared.vocab().idx_to_token:
        raise PrepareError(
            "the corpus now tokenizes to another vocabulary than the model's: it is not the text the model "
            "was trained on (check the corpus URL and its SHA-1)"
        )
    ids = torch.from_numpy(prepared.ids())  # (N,) in the cache's small integer type
    splits = split_corpus(ids, data.val_fraction, data.test_fraction, data.max_tokens)
    check_enough_tokens(splits.train.numel(), train.batch_size, train.num_steps)
    get_run_logger().info(
        "tokens: %d train, %d validation, %d test", splits.train.numel(), splits.val.numel(), splits.test.numel()
    )
    return splits
