"""The first task of every training run: refuse what would fail later, before any download or training."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.config import RunConfig
from tracking import store


@task(name="check-inputs", cache_policy=NO_CACHE)
def check_inputs(config: RunConfig) -> str:
    """Refuse what would fail later, before any download or training: a missing device, an unreachable
    MLflow. Returns the tracking URI in use."""
    from deeprnn.device import resolve_device

    device = resolve_device(config.train.device)
    uri = store.check_reachable()
    get_run_logger().info("device %s, MLflow tracking at %s", device, uri)
    return uri
