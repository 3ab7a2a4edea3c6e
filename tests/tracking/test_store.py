"""deeprnn.tracking.store against a real local store: reachability, set-up, experiment ids, the URI for workers, and
which faults a retry may get past."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ports import free_port
from prefect.states import Completed, Failed

from deeprnn.tracking import store


def test_a_fresh_sqlite_store_is_created_with_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "not" / "yet" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert store.check_reachable() == f"sqlite:///{db}"
    assert db.is_file() and (tmp_path / "not" / "yet" / "mlflow.db.lock").exists()  # set up under its lock
    assert [e.name for e in MlflowClient().search_experiments()] == ["Default"]
    assert store.is_local_store()


@pytest.fixture
def own_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MLflow's credential variables and its process-wide URI as they were before the test, whatever it sets."""
    before = {name: os.environ.get(name) for name in (store.USERNAME, store.PASSWORD, "MLFLOW_TRACKING_URI")}
    for name in before:
        monkeypatch.delenv(name, raising=False)
    yield
    mlflow.set_tracking_uri(None)  # set_tracking_uri holds one URI process-wide (and writes the variable)
    for name, value in before.items():  # delenv records nothing for a variable that was not set
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_an_unreachable_server_is_refused_naming_it_without_its_password(
    monkeypatch: pytest.MonkeyPatch, own_credentials: None
) -> None:
    port = free_port()  # nothing listens on it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
    with pytest.raises(store.TrackingUnavailableError, match=f"127.0.0.1:{port} is unreachable") as info:
        store.check_reachable(timeout=2)
    assert "secret" not in str(info.value)
    assert not store.is_local_store()


def test_credentials_of_a_tracking_server_move_to_mlflows_variables(
    monkeypatch: pytest.MonkeyPatch, own_credentials: None
) -> None:
    # MLflow sends them as basic auth from its variables; no message it builds from the URI can show them.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://ann:p%40ss%2Fw0rd@mlflow.example:5000/prefix")
    store.use_tracking_uri()
    assert mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000/prefix"
    assert (os.environ[store.USERNAME], os.environ[store.PASSWORD]) == ("ann", "p@ss/w0rd")
    # A trial on another machine gets them with the URI, and moves them to its own variables again.
    worker_uri = store.worker_tracking_uri()
    assert worker_uri == "https://ann:p%40ss%2Fw0rd@mlflow.example:5000/prefix"
    del os.environ[store.USERNAME], os.environ[store.PASSWORD]  # another machine: none of this environment
    store.use_tracking_uri(worker_uri)
    assert mlflow.get_tracking_uri() == "https://mlflow.example:5000/prefix"
    assert (os.environ[store.USERNAME], os.environ[store.PASSWORD]) == ("ann", "p@ss/w0rd")


def test_a_store_without_credentials_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch, own_credentials: None) -> None:
    for uri in ("http://127.0.0.1:5000", "sqlite:///mlflow.db", "postgresql://u:pw@db/mlflow"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        store.use_tracking_uri()
        assert os.environ["MLFLOW_TRACKING_URI"] == mlflow.get_tracking_uri() == uri
        assert store.USERNAME not in os.environ


def test_experiment_ids_are_created_once(experiment: str) -> None:
    first = store.experiment_id(experiment)
    assert store.experiment_id(experiment) == first
    assert MlflowClient().get_experiment(first).name == experiment


def test_workers_get_a_relative_sqlite_path_made_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, own_credentials: None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db")
    assert store.worker_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.worker_tracking_uri() == "http://127.0.0.1:5000"


def test_a_retry_is_worth_it_for_disk_network_and_store_faults_only() -> None:
    retry = store.retry_on_io_faults(TimeoutError)
    assert retry(None, None, Failed(data=OSError("disk full")))
    assert retry(None, None, Failed(data=MlflowException("database is locked")))
    assert not retry(None, None, Failed(data=TimeoutError("ran past its timeout")))  # an OSError, but named
    assert not retry(None, None, Failed(data=ValueError("bad setting")))
    assert not retry(None, None, Completed(data=1))
