"""A real local MLflow store (sqlite in a temporary folder) for the adapter's unit tests: created once per
test process (creating a store takes seconds), one experiment per test."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from tracking import store


@pytest.fixture(scope="session")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The sqlite store every test of this folder writes to, through MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        store.check_reachable()
        yield uri


@pytest.fixture
def experiment(tracking_store: str, request: pytest.FixtureRequest) -> str:
    """An experiment of the test's own (named after it), in the shared store."""
    return re.sub(r"\W+", "-", request.node.name)


@pytest.fixture
def db_path(tracking_store: str) -> Path:
    """The store's sqlite file."""
    return Path(tracking_store.removeprefix("sqlite:///"))
