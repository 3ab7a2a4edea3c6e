"""deeprnn.tracking.runs, the dataset input when parallel runs race to create the same dataset (a race no test can set
up on cue: the store is stood in for)."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow.exceptions import MlflowException

from deeprnn.tracking import runs


class _Store:
    """Stands in for MlflowClient: fails ``fail`` times the way MLflow's store does when another run created
    the same dataset a moment earlier, then records the input."""

    def __init__(self, fail: int, message: str = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets") -> None:
        self.fail, self.message, self.logged = fail, message, []

    def log_inputs(self, run_id: str, datasets: list[Any]) -> None:
        if self.fail:
            self.fail -= 1
            raise MlflowException(self.message)
        self.logged.append((run_id, datasets))


def test_a_run_that_loses_the_race_to_create_the_dataset_logs_it_on_the_next_attempt(monkeypatch) -> None:
    store = _Store(fail=1)
    monkeypatch.setattr(runs, "MlflowClient", lambda: store)
    runs._log_input_once("run-1", "the dataset")  # type: ignore[arg-type]
    assert store.logged == [("run-1", ["the dataset"])]


def test_other_store_errors_and_a_lasting_conflict_are_not_hidden(monkeypatch) -> None:
    monkeypatch.setattr(runs.time, "sleep", lambda seconds: None)
    other = _Store(fail=1, message="the store is read-only")
    monkeypatch.setattr(runs, "MlflowClient", lambda: other)
    with pytest.raises(MlflowException, match="read-only"):
        runs._log_input_once("run-1", "the dataset")  # type: ignore[arg-type]
    lasting = _Store(fail=5)
    monkeypatch.setattr(runs, "MlflowClient", lambda: lasting)
    with pytest.raises(MlflowException, match="UNIQUE constraint"):
        runs._log_input_once("run-1", "the dataset", attempts=3)  # type: ignore[arg-type]
    assert lasting.fail == 2 and not lasting.logged  # three attempts, then the error
