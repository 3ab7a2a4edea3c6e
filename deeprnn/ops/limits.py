"""How long a training task may run before Prefect fails it (``timeout_seconds``): what the user set
(``train.timeout_minutes``), else a bound derived from the configuration that no healthy run comes near."""

from __future__ import annotations

from deeprnn.config import TrainConfig

BASE_SECONDS = 3600.0  # start-up, evaluation passes and checkpoints, on any machine
FLOOR_TOKENS_PER_SECOND = 1000.0  # far below any device: the book's 2-core CPU runs 30-100x faster


def training_timeout_seconds(train: TrainConfig, train_tokens: int) -> float:
    """``train.timeout_minutes`` in seconds when set, else one hour plus the whole run (epochs x training
    tokens) at 1,000 tokens/s."""
    if train.timeout_minutes is not None:
        return 60.0 * train.timeout_minutes
    return BASE_SECONDS + train.epochs * max(train_tokens, 0) / FLOOR_TOKENS_PER_SECOND
