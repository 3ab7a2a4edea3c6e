"""The prepare stage as a Prefect task: the corpus normalized, counted into a vocabulary and encoded into the
token cache once per corpus and settings."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.config import DataConfig
from deeprnn.data.download import CorpusFile
from deeprnn.data.prepare import PreparedCorpus, dropped_letters_warning, prepare, prepared_summary


@task(name="prepare-tokens", cache_policy=NO_CACHE)
def prepare_tokens(corpus: CorpusFile, data: DataConfig) -> PreparedCorpus:
    """Tokenize the corpus once into the token cache, or find it there (then nothing is tokenized again)."""
    prepared = prepare(corpus, data)
    logger = get_run_logger()
    logger.info(prepared_summary(prepared))
    if warning := dropped_letters_warning(prepared):
        logger.warning(warning)
    return prepared
