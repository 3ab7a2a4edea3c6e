"""``deeprnn run`` on Prefect's default settings (no PREFECT_API_URL): the CLI starts Prefect's temporary API
server itself, early, records the flow run in PREFECT_HOME's database, stops the server at exit, and says
clearly when the server cannot start."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from mlflow.tracking import MlflowClient
from ports import free_port

from deeprnn.ops.prefect_api import server_command

pytestmark = pytest.mark.e2e


def _default_env(tmp_path: Path) -> dict[str, str]:
    """A user's first command: a fresh PREFECT_HOME, no API configured, a fresh local MLflow store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        DEEPRNN_CACHE_DIR=str(tmp_path / "cache"),
        COLUMNS="250",  # one line per message, so the printed API URL is not wrapped
    )
    return env


def _deeprnn(tmp_path: Path, env: dict[str, str], *args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    """``deeprnn ARGS`` as a user types it, in ``tmp_path`` with ``env``, its output captured."""
    command = [sys.executable, "-m", "deeprnn.cli.app", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_default_run_uses_a_temporary_server_records_the_run_and_stops_it(tmp_path: Path, book_url: str) -> None:
    env = _default_env(tmp_path)
    proc = _deeprnn(
        tmp_path,
        env,
        "run",
        "--preset",
        "smoke",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--data-url",
        book_url,
        "--data-sha1",
        BOOK_SHA1,
        "--json",
        str(tmp_path / "result.json"),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A first run on a fresh PREFECT_HOME, offline or not, says nothing the user cannot act on: no ERROR line
    # (the telemetry heartbeat of the temporary server), no traceback, no MLflow warning about the dataset.
    printed = proc.stdout + proc.stderr
    assert "ERROR" not in printed and "Traceback" not in printed, printed[-5000:]
    assert "interpreted in multiple ways" not in printed and "WARNING" not in printed, printed[-5000:]
    # The stage stamps the pipeline benchmark splits a run by, in the order the stages ran.
    stamps = json.loads((tmp_path / "result.json").read_text())["timings"]
    order = [
        "cli_ready_at",
        "pipeline_started_at",
        "fit_started_at",
        "fit_finished_at",
        "evaluated_at",
        "logged_at",
        "flow_returned_at",
    ]
    assert list(stamps) == order and [stamps[k] for k in order] == sorted(stamps.values())
    found = re.search(r"Prefect's temporary server http://127\.0\.0\.1:(\d+)/api", proc.stdout)
    assert found, proc.stdout
    assert not _listening(int(found.group(1))), "the temporary API server outlived the command"

    # The flow run is in PREFECT_HOME's database, as with Prefect's own ephemeral mode, and completed.
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        rows = db.execute("SELECT id, state_type FROM flow_run").fetchall()
    assert len(rows) == 1 and rows[0][1] == "COMPLETED"

    run_id = proc.stdout.strip().splitlines()[-1].removeprefix("run id: ").strip()
    tags = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(run_id).data.tags
    assert tags["prefect.flow_run_id"] == rows[0][0]
    assert "prefect.flow_run_url" not in tags  # that server has no UI: no link rather than a dead one


def test_server_command_is_prefects_own(tmp_path: Path) -> None:
    """The command ``start_temporary_api`` runs is the one Prefect's SubprocessASGIServer runs (a real one,
    started and stopped here), so a Prefect upgrade that changes it fails this test."""
    from prefect.server.api.server import SubprocessASGIServer

    port = free_port()
    server = SubprocessASGIServer(port=port)
    process = server._run_uvicorn_command()
    try:
        assert list(process.args) == server_command(port)
    finally:
        process.kill()
        process.wait()
        server.stop()


def test_server_that_does_not_answer_in_time_is_stopped_with_a_clear_error(tmp_path: Path, book_url: str) -> None:
    env = {**_default_env(tmp_path), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    proc = _deeprnn(tmp_path, env, "run", "--preset", "smoke", "--device", "cpu", "--data-url", book_url, timeout=300)
    assert proc.returncode == 1
    assert (
        "did not answer within 1 s" in proc.stderr and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in proc.stderr
    )
    assert not (tmp_path / "cache").exists(), "nothing is downloaded when the API is not there"


def test_server_that_cannot_start_says_so(tmp_path: Path, book_url: str) -> None:
    (tmp_path / "not-a-folder").write_text("")
    env = {
        **_default_env(tmp_path),
        # A database the server cannot create: it fails at start-up, as with a broken PREFECT_HOME.
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'not-a-folder' / 'prefect.db'}",
    }
    proc = _deeprnn(tmp_path, env, "run", "--preset", "smoke", "--device", "cpu", "--data-url", book_url, timeout=300)
    assert proc.returncode == 1
    assert "temporary API server exited with status" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "cache").exists()


def test_a_command_killed_outright_leaves_no_temporary_server_behind(tmp_path: Path, book_url: str) -> None:
    """SIGKILL skips the command's atexit hook; the server gets SIGTERM from the kernel and stops anyway."""
    import signal
    import time

    import psutil

    command = [sys.executable, "-m", "deeprnn.cli.app", "run", "--preset", "smoke", "--epochs", "50", "--device", "cpu"]
    proc = subprocess.Popen(
        [*command, "--data-url", book_url], env=_default_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline, servers = time.monotonic() + 120, []
        while not servers and time.monotonic() < deadline and proc.poll() is None:
            servers = [c for c in psutil.Process(proc.pid).children() if "uvicorn" in " ".join(c.cmdline())]
            time.sleep(0.2)
        assert servers, "the command never started its temporary server"
        time.sleep(3)  # let the server get going
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive, f"the temporary server outlived the killed command: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
