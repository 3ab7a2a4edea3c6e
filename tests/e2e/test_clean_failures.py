"""Every expected failure ends with its one message and no Python traceback: in the flow run's logs as the
Prefect API stores them (what the dashboard shows), in the flow run's state, and in what `deeprnn run` prints.
An unexpected error keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker

import deeprnn.tracking.store
from deeprnn.flows.train_flow import train_lm

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CPU = {"device": "cpu", "epochs": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[Path]:
    """One sqlite MLflow store and corpus files for the module."""
    root = tmp_path_factory.mktemp("clean-failures")
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("the time traveller said: caf\u00e9\n".encode("latin-1") * 50)
    (root / "chinese.txt").write_text("时间机器，是一部小说。\n" * 200, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DEEPRNN_CACHE_DIR", str(root / "cache"))
        deeprnn.tracking.store.check_reachable()
        yield root


def _flow_run_logs(flow_run_id: Any) -> list[tuple[int, str]]:
    """(level, message) of every log record the API holds for the flow run, its tasks' records included."""
    APILogWorker.drain_all(timeout=10)  # records go to the API in batches from a background thread
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [(log.level, log.message) for log in logs]


def _fault_cases(
    store: Path, fault_server: Any, closed_port: int
) -> dict[str, tuple[dict[str, Any], dict[str, str], str]]:
    """name -> (flow parameters, environment changes, the message the user must see)."""
    book = fault_server.url("/clean/timemachine.txt")
    cases = {
        "http-404": ({"data": {"url": fault_server.url("/missing/timemachine.txt")}}, {}, "HTTP 404 Not Found for"),
        "sha1-mismatch": ({"data": {"url": book, "sha1": "0" * 40}}, {}, "sha1 mismatch for"),
        "empty": ({"data": {"url": str(store / "empty.txt")}}, {}, "is empty"),
        "binary": ({"data": {"url": str(store / "binary.txt")}}, {}, "looks binary"),
        "not-utf8": ({"data": {"url": str(store / "latin1.txt")}}, {}, "is not UTF-8 text"),
        "normalizes-to-nothing": (
            {"data": {"url": str(store / "chinese.txt")}},
            {},
            "normalizes to nothing with --normalize d2l",
        ),
        "ftp-url": ({"data": {"url": "ftp://example.org/book.txt"}}, {}, "unsupported URL scheme 'ftp'"),
        "too-short": ({"data": {"url": book, "max_tokens": 100}}, {}, "too few for one minibatch"),
        "mlflow-unreachable": (
            {"data": {"url": book}},
            {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port}"},
            "is unreachable",
        ),
        "diverged": (
            {"data": {"url": book}, "train": {"epochs": 8, "lr": 100.0, "weight_decay": 0.1}},
            {},
            "training diverged at epoch",
        ),
        "resume-unknown-run": ({"resume_run_id": "f" * 32}, {}, "no MLflow run"),
    }
    if not torch.cuda.is_available():
        cases["no-cuda"] = (
            {"train": {"device": "cuda"}},
            {},
            "'cuda' was requested but this machine has no usable CUDA GPU",
        )
    return cases


def test_every_expected_failure_leaves_its_message_and_no_traceback_in_the_flow_run_logs(
    store: Path, fault_server: Any, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    problems = []
    for name, (params, env, expected) in _fault_cases(store, fault_server, closed_port).items():
        params = {"preset": "smoke", "experiment": name, "runs_dir": str(store / "runs"), **params}
        params["train"] = {**CPU, **params.get("train", {})}
        with monkeypatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            state = train_lm(**params, return_state=True)
        logs = _flow_run_logs(state.state_details.flow_run_id)
        text = "\n".join(message for _, message in logs)
        if not state.is_failed():
            problems.append(f"{name}: the flow run is {state.type}, not FAILED")
        if expected not in (state.message or ""):
            problems.append(f"{name}: the flow run's state message {state.message!r} lacks {expected!r}")
        if expected not in text:
            problems.append(f"{name}: no log record says {expected!r}")
        if "Traceback" in text or 'File "' in text:
            problems.append(f"{name}: a traceback in the flow run's logs:\n{text[-2000:]}")
    assert problems == [], "\n".join(problems)


def test_the_cli_prints_the_message_once_and_no_traceback(store: Path, fault_server: Any, prefect_api: str) -> None:
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "DEEPRNN_CACHE_DIR": str(store / "cache"),
        "COLUMNS": "250",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    url = fault_server.url("/missing/cli/timemachine.txt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeprnn.cli.app",
            "run",
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--data-url",
            url,
            "--experiment",
            "cli-404",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=store,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: HTTP 404 Not Found for {url} (check the URL)"], out[-3000:]
    # Once: not also in Prefect's lines for the failed task and flow run (they stay in the flow run's logs).
    assert out.count("HTTP 404 Not Found") == 1, out[-3000:]


class Bug(Exception):
    """Stands for a programming error: not one of the expected errors."""


@task
def broken_step() -> None:
    raise Bug("a bug in the code")


@flow
def broken_flow() -> None:
    broken_step()


def test_an_unexpected_error_keeps_its_traceback(store: Path) -> None:
    state = broken_flow(return_state=True)
    assert state.is_failed()
    text = "\n".join(message for _, message in _flow_run_logs(state.state_details.flow_run_id))
    assert "Traceback" in text and "a bug in the code" in text


def test_training_past_its_timeout_fails_once_cleanly_and_the_run_is_failed(
    store: Path, fault_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    import deeprnn.tasks.pipeline_tasks as pipeline
    from deeprnn.config import TrainConfig
    from deeprnn.ops.failures import message
    from deeprnn.ops.limits import training_timeout_seconds

    # The timeout is the user's when set, else derived from the run's size (one hour plus 1,000 tokens/s).
    assert training_timeout_seconds(TrainConfig(timeout_minutes=5), 10_000) == 300
    assert training_timeout_seconds(TrainConfig(epochs=500), 9_000) == 3600 + 4500
    # A real timeout, shortened from minutes to a second so that the test is quick.
    monkeypatch.setattr(pipeline, "training_timeout_seconds", lambda train, tokens: 1.0)
    state = train_lm(
        preset="smoke",
        data={"url": fault_server.url("/timeout/timemachine.txt")},
        train={"device": "cpu", "epochs": 500, "eval_every": 1},
        experiment="timeout",
        runs_dir=str(store / "runs"),
        return_state=True,
    )
    assert state.is_failed()
    text = "\n".join(m for _, m in _flow_run_logs(state.state_details.flow_run_id))
    assert "exceeded timeout of 1.0 second(s)" in text and "Traceback" not in text
    assert "--timeout-minutes" in message(state.result(raise_on_failure=False))
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("timeout").experiment_id])
    assert run.info.status == "FAILED"
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    (training,) = [t for t in task_runs if t.name.startswith("train-model")]
    assert training.run_count == 1 and training.state.name == "TimedOut"  # not retried: it would time out again
