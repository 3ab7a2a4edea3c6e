"""The generate stage as a Prefect task: every prefix continued by a checkpoint's model, in one batch."""

from __future__ import annotations

from pathlib import Path

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.config import SampleConfig
from deeprnn.device import as_device
from deeprnn.generate import generate_batch
from deeprnn.training import checkpoint


@task(name="generate-samples", cache_policy=NO_CACHE)
def generate_samples(
    checkpoint_path: str, device: torch.device | str, sample: SampleConfig | None = None
) -> dict[str, str]:
    """Continue each prefix with the selected model (greedy unless a temperature is set); ``sample`` replaces
    the checkpoint's own sample settings."""
    model, voc, config = checkpoint.restore_model(checkpoint.load(Path(checkpoint_path)), as_device(device))
    s = sample or config.sample
    # All prefixes as one batch: one forward step per generated token for all of them.
    texts = generate_batch(
        model,
        voc,
        s.prefixes,
        s.num_chars,
        token=config.data.token,
        temperature=s.temperature,
        top_k=s.top_k,
        seed=s.seed,
        normalize=config.data.normalize,  # each prefix as the corpus's rule wrote the training text
    )
    samples = dict(zip(s.prefixes, texts))
    logger = get_run_logger()
    for text in samples.values():
        logger.info("sample: %s", text)
    return samples
