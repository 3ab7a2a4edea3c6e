"""The download stage as a Prefect task: the corpus fetched into the hash-checked cache, network faults retried."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from deeprnn.data.download import CorpusFile, TransientDownloadError, fetch_corpus


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only network faults (timeouts, refused connections, 5xx), never 4xx or hash mismatches."""
    return isinstance(state.result(raise_on_failure=False), TransientDownloadError)  # the failed state's error


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
