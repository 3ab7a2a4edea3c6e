"""What `deeprnn run` can tell in milliseconds is refused before Prefect or MLflow start: a missing corpus
file, a device this machine lacks, a --resume run the store does not hold. One line, exit code 1, no
traceback, no Prefect flow run and no MLflow run created."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client

from cli.preflight import missing_device

pytestmark = pytest.mark.e2e


def _flow_runs() -> int:
    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(limit=200))


def _deeprnn(cli_env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.app", *args], capture_output=True, text=True, timeout=120, env=cli_env
    )
    return proc, time.perf_counter() - started


def _assert_refused(proc: subprocess.CompletedProcess[str], seconds: float, message: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert proc.stdout == "" and proc.stderr.splitlines() == [f"error: {message}"], out
    assert seconds < 5.0, f"refused after {seconds:.1f} s"  # before the seconds Prefect and MLflow take to load


def test_a_missing_corpus_or_absent_device_is_refused_before_prefect_or_mlflow(
    cli_env: dict[str, str], workdir: Path
) -> None:
    store = Path(cli_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    before = _flow_runs()
    cases = [
        (["--data-url", str(workdir / "my.txt")], f"corpus file not found: {workdir / 'my.txt'}"),
        (["--data-url", f"file://{workdir}/gone/"], f"corpus file not found: {workdir}/gone"),
        (
            ["--data-url", "ftp://example.org/book.txt"],
            "unsupported URL scheme 'ftp' in 'ftp://example.org/book.txt': use http, https, file or a path",
        ),
        (["--device", "mps"], missing_device("mps")),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], missing_device("cuda")))
    for args, message in cases:
        assert message is not None
        proc, seconds = _deeprnn(cli_env, "run", "--preset", "smoke", *args)
        _assert_refused(proc, seconds, message)
    assert _flow_runs() == before  # no flow run
    assert not store.exists() and not (workdir / "runs").exists()  # no MLflow store, let alone a run


def test_an_unknown_or_deleted_resume_run_is_refused_before_prefect(cli_env: dict[str, str], workdir: Path) -> None:
    client = MlflowClient()  # the test's own sqlite store (workdir's MLFLOW_TRACKING_URI)
    deleted = client.create_run(client.create_experiment("early-refusals")).info.run_id
    client.delete_run(deleted)
    before = _flow_runs()
    unknown = "0123456789abcdef0123456789abcdef"

    proc, seconds = _deeprnn(cli_env, "run", "--resume", unknown)
    _assert_refused(
        proc,
        seconds,
        f"no MLflow run '{unknown}' in {cli_env['MLFLOW_TRACKING_URI']}: check the run id and MLFLOW_TRACKING_URI",
    )
    proc, seconds = _deeprnn(cli_env, "run", "--resume", deleted)
    _assert_refused(proc, seconds, f"MLflow run {deleted} was deleted; restore it in MLflow first")

    assert _flow_runs() == before
    assert [
        r.info.run_id
        for r in client.search_runs([client.get_experiment_by_name("early-refusals").experiment_id], run_view_type=3)
    ] == [deleted]
