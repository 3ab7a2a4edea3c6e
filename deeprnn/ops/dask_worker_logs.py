"""A Dask worker preload for the sweeps' own clusters: ``distributed`` imports this module in each worker process
and calls ``dask_setup``.

When a stopped sweep closes its cluster, a worker's heartbeat can race the worker's own close and log
``Failed to communicate with scheduler during heartbeat`` with the traceback of ``CommClosedError:
ConnectionPool closing``. That is the worker shutting down as asked, not a fault, and a Ctrl-C must print no
traceback: the filter drops that record, and only that one.
"""

from __future__ import annotations

import logging
from typing import Any

PRELOAD = __name__  # what the cluster's workers are given as ``preload``
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
POOL_CLOSING = "ConnectionPool closing"


class ClosingHeartbeatFilter(logging.Filter):
    """Drops the heartbeat failure a closing worker logs about its own closed connection pool."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that one record; True for every other."""
        from distributed.comm.core import CommClosedError

        error = record.exc_info[1] if record.exc_info else None
        closing = isinstance(error, CommClosedError) and POOL_CLOSING in str(error)
        return not (closing and record.getMessage().startswith(HEARTBEAT_FAILED))


def dask_setup(worker: Any) -> None:
    """Install the filter on the worker's logger (``distributed`` calls this once per worker process)."""
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, ClosingHeartbeatFilter) for f in logger.filters):
        logger.addFilter(ClosingHeartbeatFilter())
