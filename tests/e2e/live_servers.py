"""Start, wait for and stop real server processes (``mlflow server``, ``prefect server``, a Prefect worker) for
the end-to-end tests. Every process binds 127.0.0.1 and runs in its own process group, so teardown can stop it
with all its children."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ports import free_port as free_port  # the one copy, re-exported for the e2e tests

# The test workers ask for runs every second, not every 10 s (Prefect's default): each run starts sooner.
WORKER_QUERY_SECONDS = "1"
SERVER_START_TIMEOUT = 240.0  # a fresh server answers in ~15 s on an idle 2-core machine; CI may be busy


def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a server's log, for failure messages."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def start_process(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so teardown can stop its children too), output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = SERVER_START_TIMEOUT) -> float:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or times out. Returns seconds."""
    import requests

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before answering {url}:\n{log_tail(log)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_process_group(proc)
    pytest.fail(f"no answer from {url} after {timeout:.0f} s:\n{log_tail(log)}")


def stop_process_group(proc: subprocess.Popen, first: signal.Signals = signal.SIGTERM, grace: float = 30.0) -> None:
    """Signal the process group (``first``, then SIGKILL after ``grace`` seconds) and reap the leader."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, first)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Children (flow-run processes, uvicorn workers) may outlive the leader: end the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@dataclass
class Server:
    """A server started by a test: its base URL, its folder, and the environment that reaches it."""

    url: str
    root: Path
    env: dict[str, str]
    log: Path
    startup_seconds: float


class AlertReceiver:
    """A real HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it (the alert webhook)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                receiver.bodies.append(json.loads(self.rfile.read(length) or b"{}"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout: float = 180.0) -> dict[str, Any]:
        """The first body whose text mentions ``text``; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in list(self.bodies):
                if text in json.dumps(body, ensure_ascii=False):  # run names hold a middle dot
                    return body
            time.sleep(1)
        pytest.fail(f"no alert mentioning {text!r} within {timeout:.0f} s; got {self.bodies}")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
