"""A real local MLflow store (sqlite in a temporary folder) for the adapter's unit tests: created once per
test process (creating a store takes seconds), one experiment per test."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from deeprnn.tracking import store


@pytest.fixture(scope="session")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The sqlite store every test of this folder writes to, through MLFLOW_TRACKING_URI."""
    folder = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        # A sqlite store keeps artifacts in ./mlruns of the folder it was opened from (made absolute then, and
        # the opened store is kept): open it from the temporary folder, not the checkout.
        with pytest.MonkeyPatch.context() as here:
            here.chdir(folder)
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
