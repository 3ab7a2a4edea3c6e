"""The splits stage as a Prefect task: the cached token ids cut into train, validation and test (the batches'
source), checked against the model's vocabulary."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.config import DataConfig, TrainConfig
from deeprnn.data.batching import Splits
from deeprnn.data.prepare import PreparedCorpus
from deeprnn.data.vocab import Vocab
from deeprnn.pipeline import make_splits


@task(name="prepare-splits", cache_policy=NO_CACHE)
def prepare_splits(
    prepared: PreparedCorpus, data: DataConfig, train: TrainConfig, vocab: Vocab | None = None
) -> Splits:
    """Cut the cached token ids into train/validation/test (views of the memory map, nothing copied); refuse a
    training part too short for one minibatch, and ids made with another vocabulary than ``vocab``."""
    splits = make_splits(prepared, data, train, vocab)
    get_run_logger().info(
        "tokens: %d train, %d validation, %d test", splits.train.numel(), splits.val.numel(), splits.test.numel()
    )
    return splits
