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

from deeprnn.cli.preflight import missing_device, resume_refusal

pytestmark = pytest.mark.e2e


def _flow_runs() -> int:
    with get_client(sync_client=True) as client:
        return len(client.read_flow_runs(limit=200))


def _deeprnn(cli_env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "deeprnn.cli.app", *args], capture_output=True, text=True, timeout=120, env=cli_env
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


def test_the_device_check_refuses_only_what_it_is_sure_of() -> None:
    assert missing_device("mps", platform="linux") == "device 'mps' was requested but Apple MPS is not available here"
    assert missing_device("mps", platform="darwin") is None  # torch decides there
    assert missing_device("cpu") is None and missing_device("auto") is None
    if torch.cuda.is_available():
        assert missing_device("cuda") is None and missing_device("cuda:0") is None
    else:  # a CPU-only build, or no driver: the message resolve_device would give
        assert "'cuda:1' was requested but this machine has no usable CUDA GPU" in (missing_device("cuda:1") or "")


def test_the_run_lookup_answers_for_local_stores_and_leaves_an_unreachable_server_to_the_flow(
    tmp_path: Path, closed_port: int
) -> None:
    run_id = "0123456789abcdef0123456789abcdef"

    def missing_run(run_id: str, uri: str) -> str | None:
        return resume_refusal(run_id, uri, None, str(tmp_path / "runs"), {})

    # A file store: <root>/<experiment id>/<run id>/meta.yaml.
    (tmp_path / "mlruns" / "1" / run_id).mkdir(parents=True)
    (tmp_path / "mlruns" / "1" / run_id / "meta.yaml").write_text("lifecycle_stage: active\n", encoding="utf-8")
    assert missing_run(run_id, f"file://{tmp_path / 'mlruns'}") is None
    assert "no MLflow run 'ffff'" in (missing_run("ffff", f"file://{tmp_path / 'mlruns'}") or "")
    # No store at all holds no run; a store that is not MLflow's is MLflow's to report.
    assert "no MLflow run" in (missing_run(run_id, f"sqlite:///{tmp_path / 'none.db'}") or "")
    (tmp_path / "other.db").write_bytes(b"not a database")
    assert missing_run(run_id, f"sqlite:///{tmp_path / 'other.db'}") is None
    started = time.perf_counter()
    assert missing_run(run_id, f"http://127.0.0.1:{closed_port}") is None
    assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize("budget", ["0", " ", "1ms", "none"])
def test_a_time_budget_that_is_not_one_is_refused_in_one_line(
    cli_env: dict[str, str], workdir: Path, budget: str
) -> None:
    """0 and blanks once meant "no budget" (a thousand epochs instead of five minutes); now nothing but a
    duration or ``off`` is taken, and the refusal lists what is."""
    proc, seconds = _deeprnn(cli_env, "run", "--data-url", "my.txt", "--time-budget", budget)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: --time-budget: {budget!r} is not a time budget: give a duration such as 90s, 2m, 1h30m or 1.5h "
        "(units h, m, s; a plain number is seconds), from 1 s to 30 days, or off for none"
    ]
    assert seconds < 3.0 and not (workdir / "mlflow.db").exists()
