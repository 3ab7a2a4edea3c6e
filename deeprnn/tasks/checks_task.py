"""The first task of every training run: refuse what would fail later, before any download or training."""

from __future__ import annotations

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.config import RunConfig
from deeprnn.tracking import store


@task(name="check-inputs", cache_policy=NO_CACHE)
def check_inputs(config: RunConfig) -> torch.device:
    """Refuse what would fail later, before any download or training: a missing device, an unreachable
    MLflow. Returns the device, resolved once for the whole run: the later tasks take it as it is."""
    from deeprnn.device import resolve_device

    device = resolve_device(config.train.device)
    uri = store.check_reachable()
    get_run_logger().info("device %s, MLflow tracking at %s", device, uri)
    return device
