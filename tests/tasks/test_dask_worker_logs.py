"""A sweep's own Dask cluster: its workers drop the heartbeat traceback of their own close (a stopped sweep
prints no traceback) and log every other heartbeat failure as before; a closed batched connection is one line,
without its traceback, in the workers and in the sweep's own process."""

from __future__ import annotations

import logging
import sys

from distributed import Client, LocalCluster

from deeprnn.ops.cluster import dask_task_runner
from deeprnn.ops.dask_worker_logs import BATCHED_CLOSED, HEARTBEAT_FAILED, POOL_CLOSING


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


def _closed_comm_lines() -> list[str]:
    """What ``distributed.batched`` prints in this process for a closed stream (INFO) and a failed send (ERROR)."""
    import io

    from distributed.comm.core import CommClosedError

    logger = logging.getLogger("distributed.batched")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        for log in (logger.info, logger.error):
            try:
                raise CommClosedError("in <TCP (closed) Scheduler connection to worker>: Stream is closed")
            except CommClosedError:
                log(
                    "%s <TCP (closed)>",
                    BATCHED_CLOSED if log == logger.info else "Error in batched write",
                    exc_info=True,
                )
    finally:
        logger.removeHandler(handler)
        logger.level = level
    return stream.getvalue().splitlines()


def test_a_closed_batched_comm_is_one_line_in_the_workers_and_in_the_sweeps_process() -> None:
    runner = dask_task_runner(workers=1, use_gpus=False)  # installs the filter in this process
    here = _closed_comm_lines()
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        (there,) = client.run(_closed_comm_lines).values()
    for lines in (here, there):
        assert lines[0] == f"{BATCHED_CLOSED} <TCP (closed)>" and lines[1] == "Error in batched write <TCP (closed)>"
        assert lines.count("Traceback (most recent call last):") == 1  # the ERROR keeps its traceback
        assert lines.index("Traceback (most recent call last):") == 2
