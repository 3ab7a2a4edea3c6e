"""Fixtures for the task unit tests: tasks run as plain functions (``task.fn()``), with no Prefect server and
no flow run; a corpus cache per test; a local HTTP server that counts the requests for the corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
from corpora import CorpusFile, CountingServer
from ports import free_port
from prefect.logging import disable_run_logger


@pytest.fixture(autouse=True)
def _no_run_context() -> Iterator[None]:
    """``get_run_logger()`` raises outside a flow or task run unless Prefect's run loggers are disabled, which
    is what ``disable_run_logger`` is for: the task's own code runs unchanged, its log lines go nowhere."""
    with disable_run_logger():
        yield


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models are fastest on one thread (the runners are small and shared); torch's setting comes back."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own corpus cache (``DEEPRNN_CACHE_DIR``), empty at the start."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def counting_server(corpus_file: CorpusFile) -> Iterator[CountingServer]:
    """A ``CountingServer`` of the corpus (``/timemachine.txt``), stopped after the test."""
    server = CountingServer(corpus_file.path.parent)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def refused_url() -> str:
    """A URL on 127.0.0.1 whose port nobody listens on (the connection is refused)."""
    return f"http://127.0.0.1:{free_port()}/timemachine.txt"
