"""A Dask worker preload for the sweeps' own clusters: ``distributed`` imports this module in each worker process
and calls ``dask_setup``.

When a stopped sweep closes its cluster, a worker's heartbeat can race the worker's own close and log
``Failed to communicate with scheduler during heartbeat`` with the traceback of ``CommClosedError:
ConnectionPool closing``. That is the worker shutting down as asked, not a fault, and a Ctrl-C must print no
traceback: the filter drops that record, and only that one.

When any sweep's cluster closes, the scheduler (in the sweep's own process) and the workers may log the INFO line
``Batched Comm Closed`` with the traceback of the stream their peer just closed: the line is kept, its traceback
dropped (``quiet_closed_comms``, installed in the workers and in the process that starts a local cluster).
"""

from __future__ import annotations

import logging
from typing import Any

PRELOAD = __name__  # what the cluster's workers are given as ``preload``
HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
POOL_CLOSING = "ConnectionPool closing"
BATCHED_CLOSED = "Batched Comm Closed"  # distributed.batched's INFO line when the other side hung up


def drop_closing_heartbeat(record: logging.LogRecord) -> bool:
    """A log filter: False for the heartbeat failure a closing worker logs about its own closed connection pool;
    True for every other record."""
    from distributed.comm.core import CommClosedError

    error = record.exc_info[1] if record.exc_info else None
    closing = isinstance(error, CommClosedError) and POOL_CLOSING in str(error)
    return not (closing and record.getMessage().startswith(HEARTBEAT_FAILED))


def drop_closed_comm_traceback(record: logging.LogRecord) -> bool:
    """A log filter: keeps Dask's INFO line that a batched connection closed (``Batched Comm Closed``, at INFO
    or below), without the traceback of the close; always True."""
    if record.levelno <= logging.INFO and record.getMessage().startswith(BATCHED_CLOSED):
        record.exc_info, record.exc_text = None, None
    return True


def quiet_closed_comms() -> None:
    """Install ``drop_closed_comm_traceback`` on ``distributed.batched``'s logger in this process (once: a logger
    keeps one of each filter)."""
    logging.getLogger("distributed.batched").addFilter(drop_closed_comm_traceback)


def dask_setup(worker: Any) -> None:
    """Install the filters on the worker's loggers (``distributed`` calls this once per worker process)."""
    logging.getLogger("distributed.worker").addFilter(drop_closing_heartbeat)
    quiet_closed_comms()
