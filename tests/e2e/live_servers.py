"""Start, wait for and stop real server processes (``mlflow server``, ``prefect server``, a Prefect worker) for
the end-to-end tests. Every process binds 127.0.0.1 and runs in its own process group, so teardown can stop it
with all its children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from ports import free_port as free_port  # the one copy, re-exported for the e2e tests

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
