"""Adaptive sweeps with the study in a real PostgreSQL server on 127.0.0.1 (a throwaway cluster): its URLs open
with psycopg 3 (``postgresql://`` and ``postgres://``), a sweep runs its trials there, and a trial whose
process was killed on another machine is failed by Optuna's heartbeat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from corpora import CORPUS_SHA1 as BOOK_SHA1
from mlflow.tracking import MlflowClient
from postgres_server import needs_postgres, postgres_server

from deeprnn.flows.sweep_flow import sweep_lm
from deeprnn.ops.cluster import dask_task_runner
from deeprnn.search.optuna_study import StudySpec, driver_url, open_storage, start_study
from deeprnn.search.study_orphans import fail_orphaned_trials

pytestmark = [pytest.mark.e2e, needs_postgres]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """``postgresql://deeprnn:PASSWORD@127.0.0.1:PORT/optuna`` on a server of this module's own."""
    with postgres_server() as server:
        yield server.add_database("optuna", "deeprnn", "s3cret-pw")


def test_postgres_urls_open_with_psycopg_3_and_hold_a_study(postgres_url: str) -> None:
    for url in (postgres_url, postgres_url.replace("postgresql://", "postgres://", 1)):
        storage = open_storage(url)
        assert storage.engine.dialect.driver == "psycopg"  # type: ignore[attr-defined]
    spec = StudySpec("pg", postgres_url.replace("postgresql://", "postgres://", 1), {"train.lr": [0.5, 1]}, "smoke", {})
    start_study(spec)[0].enqueue_trial({"train.lr": 0.5})
    assert len(start_study(StudySpec("pg", postgres_url, spec.space, "smoke", {}))[0].trials) == 1


# A worker of another machine (its owner names another host) holding a trial, its heartbeat beating each second.
OWNER = """
import sys, time, warnings, optuna
from deeprnn.search.optuna_study import driver_url
from deeprnn.search.study_orphans import heartbeat
storage = optuna.storages.RDBStorage(driver_url(sys.argv[1]), heartbeat_interval=1, grace_period=2)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trial = optuna.load_study(study_name="beats", storage=storage).ask()
trial.set_user_attr("deeprnn.owner", {"host": "another-machine", "pid": 1, "started": 0.0})
with heartbeat(trial):
    print("ready", trial.number, flush=True)
    time.sleep(600)
"""


def test_a_trial_killed_on_another_machine_is_failed_by_its_heartbeat(postgres_url: str) -> None:
    storage = optuna.storages.RDBStorage(driver_url(postgres_url), heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="beats", storage=storage)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", OWNER, postgres_url], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    try:
        numbers = [int(_ready(proc)) for proc in procs]
        os.kill(procs[0].pid, signal.SIGKILL)
        procs[0].wait()
        time.sleep(4)  # past the grace period
        cleanup = fail_orphaned_trials(study, storage)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert cleanup.failed == [(numbers[0], "no heartbeat for over 2 s: its process is gone")]
    assert cleanup.left_running == [numbers[1]]
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    assert states == {numbers[0]: "FAIL", numbers[1]: "RUNNING"}


def _ready(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    word, _, number = proc.stdout.readline().partition(" ")
    assert word == "ready", "the trial's owner did not start"
    return number.strip()


def test_a_sweep_runs_its_trials_in_postgres(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str, book_url: str
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("DEEPRNN_OPTUNA_STORAGE", postgres_url)  # a URL with a password goes by the environment
    summary: Any = sweep_lm.with_options(task_runner=dask_task_runner(workers=1, use_gpus=False))(
        space={"train.lr": [2.0, 0.5]},
        preset="smoke",
        data={"url": book_url, "sha1": BOOK_SHA1, "val_fraction": 0.1},
        model={"num_hiddens": 16},
        train={"device": "cpu", "max_steps": 20, "eval_every_steps": 10, "epochs": 100},
        search="optuna",
        max_trials=1,
        pruner="none",
        study="pg-sweep",
        experiment="study-pg",
        register_best=False,
    )
    assert (summary.trials_finished, summary.study_trials) == (1, 1)
    study = optuna.load_study(study_name="pg-sweep", storage=open_storage(postgres_url))
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    runs = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert {MlflowClient().get_run(r).info.status for r in runs} == {"FINISHED"}
    assert all(t.user_attrs["deeprnn.owner"]["pid"] != os.getpid() for t in study.trials)  # asked by the workers
