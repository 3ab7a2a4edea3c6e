"""End-to-end fixtures: Prefect's test harness (a real temporary API server, started once per session), a
fresh MLflow sqlite store, corpus cache and working directory per test, and real ``mlflow server`` and
``prefect server`` processes on 127.0.0.1 for the tests of deployments and UI comparison."""

from __future__ import annotations

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from live_servers import Server, free_port, start_process, stop_process_group, wait_until_healthy


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Start Prefect's test harness once; yields its API URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    # As for the temporary server deeprnn starts: no telemetry heartbeat racing the tests for the fresh database.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str) -> Path:
    """A clean working folder with its own MLflow store and corpus cache, like a fresh machine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def cli_env(workdir: Path, prefect_api: str) -> dict[str, str]:
    """Environment for running the ``deeprnn`` command against the harness's API and this test's store."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    env["DEEPRNN_CACHE_DIR"] = str(workdir / "cache")
    return env


STALL_SECONDS = 120  # longer than any test waits for a stalled download


class FaultServer:
    """A real HTTP server on 127.0.0.1 that serves the book at any path ending in ``timemachine.txt``,
    answers 404 under ``/missing/`` and 500 under ``/broken/``, stalls after the first bytes under ``/stall/``
    (a download that is still running when a test stops it), and records every path it was asked for."""

    def __init__(self, book: bytes) -> None:
        self.book = book
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.hits.append(self.path)
                if self.path.startswith("/stall/"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(server.book)))
                    self.end_headers()
                    self.wfile.write(server.book[:1000])
                    self.wfile.flush()
                    time.sleep(STALL_SECONDS)
                    return
                if self.path.startswith("/missing/"):
                    status, body = 404, b"not found"
                elif self.path.startswith("/broken/"):
                    status, body = 500, b"internal error"
                elif self.path.endswith("timemachine.txt"):
                    status, body = 200, server.book
                else:
                    status, body = 404, b"not found"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # keep test output readable
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server (optionally with ``user:password@`` credentials)."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def count(self, prefix: str) -> int:
        """How many requests asked for a path starting with ``prefix``."""
        return sum(1 for p in self.hits if p.startswith(prefix))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="session")
def fault_server(book_path: Path) -> Iterator[FaultServer]:
    """One ``FaultServer`` for the session; tests use their own path prefixes to count their own requests."""
    server = FaultServer(book_path.read_bytes())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    return free_port()


# ---- Real servers on 127.0.0.1, started by the test modules that need them and stopped by them -------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mlflow server`` with a sqlite store and a local artifact root, as the README starts it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # The GenAI job runner (half a dozen extra processes) is not needed to track training runs.
    proc = start_process(cmd, log, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        seconds = wait_until_healthy(f"{url}/health", proc, log)
        yield Server(url, root, {**os.environ, "MLFLOW_TRACKING_URI": url}, log, seconds)
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``prefect server start`` with its own PREFECT_HOME (database, settings) on a free port.

    The scheduler service is off: deployments keep their schedules, but no run is created from them, so a
    cron that happens to fire mid-test cannot start a long run on the test's worker.
    """
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = root / "server.log"
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_process(cmd, log, env, cwd=root)
    try:
        seconds = wait_until_healthy(f"http://127.0.0.1:{port}/api/health", proc, log)
        yield Server(f"http://127.0.0.1:{port}/api", root, env, log, seconds)
    finally:
        stop_process_group(proc)
