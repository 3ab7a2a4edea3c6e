"""`deeprnn run --resume` of a run that cannot go on is refused in one line, in under 3 s, before Prefect starts:
a FINISHED run whose budget is spent, a run of another experiment, a run whose checkpoint files are gone, a
run that never logged one. The store is a real MLflow sqlite store with a real run, finished by the smoke
preset's time budget; every refusal is a real ``deeprnn`` process, timed from outside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from deeprnn.cli.preflight import resume_refusal

pytestmark = pytest.mark.e2e

REFUSED_WITHIN = 3.0  # seconds: as fast as refusing an unknown run id, far below Prefect's start


@dataclass
class Store:
    """The module's store: a FINISHED smoke run that spent its time budget, and the command's environment."""

    root: Path
    env: dict[str, str]
    run_id: str
    experiment: str

    def deeprnn(self, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "deeprnn.cli.app", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=self.env,
            cwd=self.root,
        )
        return proc, time.perf_counter() - started


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, book_path: Path) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("resume-refusals")
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=prefect_api,
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DEEPRNN_CACHE_DIR=str(root / "cache"),
    )
    # Smoke steps take milliseconds: a two-second budget ends training long before its thousand epochs.
    args = ["--preset", "smoke", "--device", "cpu", "--data-url", str(book_path), "--epochs", "1000"]
    args += ["--checkpoint-every", "1"]  # a checkpoint in MLflow however few epochs a busy machine trains
    made = Store(root, env, "", "")
    proc, _ = made.deeprnn("run", *args, "--time-budget", "2s", "--json", str(root / "run.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    made.run_id = json.loads((root / "run.json").read_text(encoding="utf-8"))["run_id"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        client = MlflowClient()
        run = client.get_run(made.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["deeprnn.stop_reason"] == "time_budget"
        assert run.data.tags["deeprnn.checkpoint"] == "checkpoints/last.pt"
        made.experiment = client.get_experiment(run.info.experiment_id).name
        yield made


def _assert_refused(proc: subprocess.CompletedProcess[str], seconds: float, message: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert proc.stdout == "" and proc.stderr.splitlines() == [f"error: {message}"], out
    assert seconds < REFUSED_WITHIN, f"refused after {seconds:.1f} s"


def test_a_finished_run_whose_time_budget_is_spent_is_refused_saying_what_to_give(store: Store) -> None:
    expected = (
        f"MLflow run {store.run_id} already FINISHED its time budget (2s), so nothing is left to train: give a "
        "longer --time-budget (above 2s), or --time-budget off and --epochs, to train it further"
    )
    for extra in ([], ["--epochs", "5000"], ["--time-budget", "2s"], ["--device", "cpu"]):
        proc, seconds = store.deeprnn("run", "--resume", store.run_id, *extra)
        _assert_refused(proc, seconds, expected)
    uri = store.env["MLFLOW_TRACKING_URI"]
    runs = str(store.root / "runs")
    # What would train something is left to the flow: a longer budget, or none (then the epochs bound it).
    assert resume_refusal(store.run_id, uri, None, runs, {"time_budget": "1m"}) is None
    assert resume_refusal(store.run_id, uri, None, runs, {"time_budget": "off"}) is None
    assert resume_refusal(store.run_id, uri, store.experiment, runs, {"time_budget": "3s"}) is None


def test_a_run_of_another_experiment_is_refused_before_prefect(store: Store) -> None:
    proc, seconds = store.deeprnn("run", "--resume", store.run_id, "--experiment", "another")
    _assert_refused(proc, seconds, f"run {store.run_id} belongs to experiment {store.experiment!r}, not 'another'")


def test_lost_checkpoint_files_are_told_apart_from_a_run_that_never_had_one(store: Store) -> None:
    local = store.root / "runs" / store.run_id
    logged = Path(MlflowClient(store.env["MLFLOW_TRACKING_URI"]).get_run(store.run_id).info.artifact_uri)
    assert (local / "last.pt").is_file() and (logged / "checkpoints" / "last.pt").is_file()
    shutil.move(local, store.root / "kept-local")
    shutil.move(logged / "checkpoints", store.root / "kept-logged")
    try:
        proc, seconds = store.deeprnn("run", "--resume", store.run_id, "--time-budget", "1m")
        _assert_refused(
            proc,
            seconds,
            f"MLflow run {store.run_id} logged a checkpoint, but its files are gone: neither {local / 'last.pt'} "
            "nor the run's artifact checkpoints/last.pt exists any more; start a new run",
        )
    finally:
        shutil.move(store.root / "kept-local", local)
        shutil.move(store.root / "kept-logged", logged / "checkpoints")

    client = MlflowClient(store.env["MLFLOW_TRACKING_URI"])  # a run stopped before its first checkpoint
    never = client.create_run(client.get_experiment_by_name(store.experiment).experiment_id).info.run_id
    client.set_tag(never, "deeprnn.stopped", "stopped before its first checkpoint: nothing to resume; start a new run")
    client.set_terminated(never, "KILLED")
    proc, seconds = store.deeprnn("run", "--resume", never)
    _assert_refused(
        proc,
        seconds,
        f"MLflow run {never} has no checkpoint to resume from: it stopped before its first checkpoint; start a new run",
    )
