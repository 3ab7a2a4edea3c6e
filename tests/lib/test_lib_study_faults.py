"""A study's faults, with real files and processes: a journal whose last record a crash cut short, one damaged
before its end, trials left RUNNING by a killed process (failed by the next sweep, by the owner's pid on this
host, by Optuna's heartbeat in a database), and trials of a sweep still running (left alone)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from deeprnn.search.optuna_study import (
    StudyError,
    StudySpec,
    check_storage,
    driver_url,
    start_study,
)
from deeprnn.search.study_orphans import OWNER_ATTR, REASON_ATTR, fail_orphaned_trials, heartbeat

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning", "ignore:Heartbeat of storage")

REPO = Path(__file__).resolve().parents[2]
SPACE = {"train.lr": [0.5, 1.0]}

# A process that asks the study for a trial as a sweep's worker does (its owner recorded, its heartbeat beating
# where the storage has one), says "ready", and trains for ever: until the test kills it.
OWNER = """
import sys, time, warnings, optuna
from optuna.distributions import CategoricalDistribution
from deeprnn.search.study_orphans import claim, heartbeat
storage, host = sys.argv[1], sys.argv[2]
if "://" in storage:
    storage = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=2)
else:
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    storage = JournalStorage(JournalFileBackend(storage))
study = optuna.load_study(study_name="s", storage=storage)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trial = study.ask({"train.lr": CategoricalDistribution([0.5, 1.0])})
claim(trial)
if host != "this":  # a worker of another machine, for the rules that cannot look at its process
    trial.set_user_attr("deeprnn.owner", {"host": host, "pid": 1, "started": 0.0})
with heartbeat(trial):
    print("ready", trial.number, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def owners() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes that each hold a RUNNING trial; any still alive at the end is killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _own_a_trial(procs: list[subprocess.Popen[str]], storage: str, host: str = "this") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, storage, host], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().startswith("ready"), "the trial's owner did not start"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _states(study: Any) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def test_trials_of_a_killed_process_are_failed_and_those_of_a_live_one_left_running(
    tmp_path: Path, owners: list[subprocess.Popen[str]]
) -> None:
    storage = str(tmp_path / "studies.journal")
    spec = StudySpec("s", storage, SPACE, "smoke", {})
    study = start_study(spec)[0]
    study.tell(study.ask({"train.lr": optuna.distributions.CategoricalDistribution([0.5, 1.0])}), 3.0)
    killed = _own_a_trial(owners, storage)
    _own_a_trial(owners, storage)  # a sweep still running on this machine
    _own_a_trial(owners, storage, host="another-machine")  # a journal cannot see another machine's processes
    study.ask()  # asked by a process that recorded no owner (an older version)
    _kill(killed)
    assert _states(study) == {0: "COMPLETE", 1: "RUNNING", 2: "RUNNING", 3: "RUNNING", 4: "RUNNING"}

    started = time.perf_counter()
    study, cleanup = start_study(spec)
    took = time.perf_counter() - started
    assert _states(study) == {0: "COMPLETE", 1: "FAIL", 2: "RUNNING", 3: "RUNNING", 4: "RUNNING"}
    assert [n for n, _ in cleanup.failed] == [1] and "process gone: pid" in cleanup.failed[0][1]
    assert study.trials[1].user_attrs[REASON_ATTR] == cleanup.failed[0][1]
    assert study.trials[1].user_attrs[OWNER_ATTR]["pid"] == killed.pid
    assert cleanup.left_running == [2, 3, 4] and cleanup.no_owner == [4]
    assert took < 5, took
    # Again: nothing more to fail, and a trial failed once is not touched again.
    assert start_study(spec)[1].failed == []


def test_a_database_fails_a_trial_whose_heartbeat_stopped_whichever_host_ran_it(
    tmp_path: Path, owners: list[subprocess.Popen[str]]
) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    silent = _own_a_trial(owners, url, host="another-machine")
    _own_a_trial(owners, url, host="another-machine")  # beating: alive, wherever it is
    _kill(silent)
    time.sleep(4)  # past the grace period
    cleanup = fail_orphaned_trials(study, storage)
    assert _states(study) == {0: "FAIL", 1: "RUNNING"}
    assert cleanup.failed == [(0, "no heartbeat for over 2 s: its process is gone")]
    assert cleanup.left_running == [1]


def test_the_heartbeat_beats_only_where_the_storage_has_one(tmp_path: Path) -> None:
    journal = JournalStorage(JournalFileBackend(str(tmp_path / "j.journal")))
    trial = optuna.create_study(study_name="s", storage=journal).ask()
    with heartbeat(trial):  # a journal has no heartbeat: nothing runs, nothing fails
        pass
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=1, grace_period=2)
    trial = optuna.create_study(study_name="s", storage=storage).ask()
    with heartbeat(trial):
        time.sleep(3)  # beyond the grace period, but beating
        optuna.storages.fail_stale_trials(trial.study)
        assert trial.study.trials[0].state == TrialState.RUNNING


def _torn(path: Path, spec: StudySpec) -> bytes:
    """A journal of ``spec``'s study whose last record a crash cut short, its bytes."""
    study = start_study(spec)[0]
    study.tell(study.ask({"train.lr": optuna.distributions.CategoricalDistribution([0.5, 1.0])}), 2.0)
    whole = path.read_bytes()
    record = json.dumps({"op_code": 5, "worker_id": "w", "trial_id": 0, "user_attr": {"x": 1}}).encode()
    path.write_bytes(whole + record[:40])
    return path.read_bytes()


def test_a_torn_last_record_is_dropped_with_a_warning_once_the_sweep_runs(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    spec = StudySpec("s", str(path), SPACE, "smoke", {})
    torn = _torn(path, spec)
    assert check_storage(spec) == 1 and path.read_bytes() == torn  # read, nothing written
    # A sweep refused for another reason writes nothing either (it used to append onto the cut line).
    other = StudySpec("s", str(path), {"train.lr": [0.5, 2.0]}, "smoke", {})
    for refused in (check_storage, start_study):
        with pytest.raises(StudyError, match="holds trials of another search"):
            refused(other)
        assert path.read_bytes() == torn
    warnings: list[str] = []
    study, _ = start_study(spec, warnings.append)
    assert warnings == [
        f"the study journal {path} ended in a record cut short (40 bytes, a crash while it was written): dropped "
        "it; Optuna had never read it, so the study is unchanged"
    ]
    assert path.read_bytes() == torn[:-40]
    study.set_user_attr("next", 1)  # a record after it reads back
    assert optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path)))).user_attrs["next"]


def test_a_journal_damaged_before_its_last_record_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    spec = StudySpec("s", str(path), SPACE, "smoke", {})
    torn = _torn(path, spec)
    # As the old sweep did: a record appended onto the cut line, then another after it.
    path.write_bytes(torn + b'{"op_code":0,"worker_id":"w","study_name":"t","directions":[1]}\n{"op_code":3}\n')
    damaged = path.read_bytes()
    lines = damaged.count(b"\n")
    for call in (check_storage, start_study):
        with pytest.raises(StudyError) as caught:
            call(spec)
        text = str(caught.value)
        assert "\n" not in text and text.startswith(f"the study journal {path} is damaged: line {lines - 1} of {lines}")
        assert f"head -n {lines - 2} {path} > KEPT.journal" in text
        assert path.read_bytes() == damaged
    # What the message says to do works: the records before the damaged line are a study Optuna reads.
    kept = tmp_path / "KEPT.journal"
    kept.write_bytes(b"".join(damaged.splitlines(keepends=True)[: lines - 2]))
    assert check_storage(StudySpec("s", str(kept), SPACE, "smoke", {})) == 1


def test_postgres_urls_name_psycopg_3() -> None:
    assert driver_url("postgresql://u:pw@db:5432/optuna") == "postgresql+psycopg://u:pw@db:5432/optuna"
    assert driver_url("postgres://u@db/optuna") == "postgresql+psycopg://u@db/optuna"
    for kept in ("postgresql+psycopg2://u@db/optuna", "postgresql+asyncpg://u@db/o", "sqlite:///s.db", "mysql://db"):
        assert driver_url(kept) == kept
    assert driver_url("studies/postgresql.journal") == "studies/postgresql.journal"
