"""An MLflow tracking server reached through ``http://user:password@...`` goes away while ``deeprnn run`` trains:
MLflow's errors quote that URL whole, yet the password appears nowhere in the command's output nor in the
flow run's logs on the Prefect API (``deeprnn.ops.password_scrub``)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from corpora import CORPUS_SHA1 as BOOK_SHA1
from live_servers import free_port, start_process, stop_process_group, wait_until_healthy

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PASSWORD = f"outage-{secrets.token_hex(6)}"


def _mlflow_server(root: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = start_process([*cmd, "--workers", "1"], root / "mlflow.log", env, cwd=root)
    wait_until_healthy(f"http://127.0.0.1:{port}/health", proc, root / "mlflow.log")
    return proc


def _flow_run_logs(since: datetime) -> str:
    """Every log line of the flow runs that started after ``since``, with their task runs' lines."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=since)))
        assert runs, "no flow run started"
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
    return "\n".join(log.message for log in logs)


def test_an_mlflow_outage_mid_run_keeps_the_tracking_password_out_of_output_and_logs(
    tmp_path: Path, prefect_api: str, book_url: str
) -> None:
    port = free_port()
    server = _mlflow_server(tmp_path, port)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.update(MLFLOW_TRACKING_URI=f"http://tracker:{PASSWORD}@127.0.0.1:{port}", DEEPRNN_CACHE_DIR=str(tmp_path / "c"))
    # MLflow gives up on the dead server within seconds instead of a minute: its error, the password in it, comes soon.
    env.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="1")
    args = ["--preset", "smoke", "--device", "cpu", "--epochs", "300", "--test-fraction", "0.02"]
    args += ["--data-url", book_url, "--data-sha1", BOOK_SHA1, "--num-tokens", "10"]
    since = datetime.now(timezone.utc)
    log = tmp_path / "cli.log"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deeprnn.cli.app", "run", *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while "epoch 3/300" not in log.read_text(encoding="utf-8", errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        stop_process_group(server)  # SIGTERM to the server's group, mid-training; it does not come back
        code = proc.wait(timeout=240)
    finally:
        stop_process_group(proc, grace=10)
        stop_process_group(server)
    output = log.read_text(encoding="utf-8", errors="replace")
    assert code == 1, output[-3000:]
    # MLflow's error reached the user, its URL without the credentials (they went to MLflow's own variables):
    # this is what carried the password.
    assert f"http://127.0.0.1:{port}/api/2.0/mlflow/" in output, output[-3000:]
    assert PASSWORD not in output
    logs = _flow_run_logs(since)
    assert f"API request to http://127.0.0.1:{port}/" in logs
    assert PASSWORD not in logs
