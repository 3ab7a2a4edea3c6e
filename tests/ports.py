"""A free TCP port on 127.0.0.1, the one helper for the tests, the benchmarks and the scripts that start servers
(the package keeps its own private copy in ``deeprnn.ops.prefect_api``: it cannot import the tests)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now: a server can bind it, and a connection to it
    is refused until one does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
