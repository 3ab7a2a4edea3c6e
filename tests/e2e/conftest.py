"""End-to-end fixtures: Prefect's test harness (a real temporary API server, started once per session) and a
fresh MLflow sqlite store, corpus cache and working directory per test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """Start Prefect's test harness once; yields its API URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str) -> Path:
    """A clean working folder with its own MLflow store and corpus cache, like a fresh machine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def cli_env(workdir: Path, prefect_api: str) -> dict[str, str]:
    """Environment for running the ``deeprnn`` command against the harness's API and this test's store."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    env["DEEPRNN_CACHE_DIR"] = str(workdir / "cache")
    return env
