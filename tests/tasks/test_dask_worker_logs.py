"""A sweep's own Dask cluster: its workers drop the heartbeat traceback of their own close (a stopped sweep
prints no traceback) and log every other heartbeat failure as before."""

from __future__ import annotations

import logging
import sys

from distributed import Client, LocalCluster

from deeprnn.ops.cluster import dask_task_runner
from deeprnn.ops.dask_worker_logs import HEARTBEAT_FAILED, POOL_CLOSING


def _kept_records() -> list[bool]:
    """In a worker process: whether its logger keeps each of three heartbeat records."""
    from distributed.comm.core import CommClosedError

    logger = logging.getLogger("distributed.worker")

    def kept(message: str, error: Exception) -> bool:
        try:
            raise error
        except Exception:
            record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, message, (), sys.exc_info())
        return bool(logger.filter(record))

    return [
        kept(f"{HEARTBEAT_FAILED}.", CommClosedError(POOL_CLOSING)),  # the worker's own close: dropped
        kept(f"{HEARTBEAT_FAILED}.", CommClosedError("in <TCP (closed)>: Stream is closed")),  # a lost scheduler
        kept("Unexpected exception during heartbeat. Closing worker.", RuntimeError("boom")),
    ]


def test_the_local_clusters_workers_drop_only_the_traceback_of_their_own_close() -> None:
    runner = dask_task_runner(workers=1, use_gpus=False)
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        kept = client.run(_kept_records)
    assert list(kept.values()) == [[False, True, True]]
