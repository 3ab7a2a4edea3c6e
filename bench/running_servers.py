"""A running Prefect server and MLflow server for the pipeline benchmark, started as the README starts them
(``prefect server start``, ``mlflow server`` with a sqlite store and proxied artifacts), each on a free port of
127.0.0.1 with its own database in ``root``; stopped with all their children when the block ends.

The process handling (own process group, health polling, teardown) is the end-to-end tests' own
(``tests/e2e/live_servers.py``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(TESTS / "e2e"), str(TESTS)]  # live_servers, and the ports helper it imports
from live_servers import free_port, start_process, stop_process_group, wait_until_healthy  # noqa: E402


@contextlib.contextmanager
def running_servers(root: Path) -> Iterator[dict[str, str]]:
    """Start both servers in ``root``; yields the variables that point ``deeprnn run`` at them."""
    root.mkdir(parents=True, exist_ok=True)
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow_cmd = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "mlartifacts")),
        *("--host", "127.0.0.1", "--port", str(mlflow_port)),
    ]
    prefect_env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    prefect_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    prefect_cmd += ["--port", str(prefect_port)]
    with contextlib.ExitStack() as stack:
        mlflow_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # as the README starts it
        mlflow_proc = start_process(mlflow_cmd, root / "mlflow.log", mlflow_env, cwd=root)
        stack.callback(stop_process_group, mlflow_proc)
        prefect_proc = start_process(prefect_cmd, root / "prefect.log", prefect_env, cwd=root)
        stack.callback(stop_process_group, prefect_proc)
        mlflow_url, prefect_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        wait_until_healthy(f"{mlflow_url}/health", mlflow_proc, root / "mlflow.log")
        wait_until_healthy(f"{prefect_url}/health", prefect_proc, root / "prefect.log")
        yield {"PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url}
