"""Fixtures shared by all test folders: the book's corpus and a local HTTP server that serves it."""

from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

BOOK_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
# The book's corpus is never inside the checkout: DEEPRNN_TEST_DATA names its folder (.ci/run sets it to
# ../shared/data); without it, the shared folder beside the checkout is tried.
SHARED_DATA = Path(os.environ.get("DEEPRNN_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="session")
def book_path() -> Path:
    """The exact file the book downloads."""
    path = SHARED_DATA / "timemachine.txt"
    if not path.is_file():
        pytest.skip(f"the book's corpus is not at {path}")
    return path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output readable
        pass


@pytest.fixture(scope="session")
def corpus_server(book_path: Path) -> Iterator[str]:
    """Base URL of a real HTTP server on 127.0.0.1 serving the shared data folder."""
    handler = functools.partial(_QuietHandler, directory=str(book_path.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def book_url(corpus_server: str) -> str:
    """URL of the book's corpus on the local server."""
    return f"{corpus_server}/timemachine.txt"
