"""Prefect tasks for the data stages: download, prepared token ids and vocabulary (cached), splits."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from deeprnn.batching import Splits
from deeprnn.config import DataConfig, TrainConfig
from deeprnn.download import CorpusFile, TransientDownloadError, fetch_corpus
from deeprnn.pipeline import make_splits
from deeprnn.prepare import PreparedCorpus, dropped_letters_warning, prepare, prepared_summary
from deeprnn.vocab import Vocab


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
    splits = make_splits(prepared, data, train, Vocab.from_dict(vocab) if vocab is not None else None)
    get_run_logger().info(
        "tokens: %d train, %d validation, %d test", splits.train.numel(), splits.val.numel(), splits.test.numel()
    )
    return splits
