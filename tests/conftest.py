"""Fixtures shared by all test folders: the corpus the tests train on and a local HTTP server that serves it.

The corpus is the book's own file when it is here: ``DEEPRNN_TEST_DATA`` names its folder (``.ci/run`` sets it
to ``../shared/data``), else the shared folder beside the checkout is tried. A clone on its own has neither, and
then the tests make a stand-in: a deterministic English-like text of about the book's size, with every letter
(so the book's 28-token character vocabulary), written to the session's temporary folder. Assertions about the
book itself check ``corpus.is_book``; everything else uses the fixture's own figures (``sha1``, ``num_chars``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from corpora import (
    BOOK_FILE,
    CORPUS_NUM_BYTES,
    CORPUS_NUM_CHARS,
    CORPUS_SHA1,
    IS_BOOK,
    STANDIN,
    Corpus,
    CorpusFile,
)

# One torch thread in every test process and every process a test starts (commands, workers, servers): the
# suite runs two test processes at once on a small runner, and more OpenMP threads than cores make each
# training spin and crawl. Set before anything imports torch; a value given by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_report_header() -> str:
    """Say in the session's header which corpus the tests use, so a log shows when the book was not found."""
    if IS_BOOK:
        return f"corpus: the book's, {BOOK_FILE}"
    return f"corpus: a generated stand-in (sha1 {CORPUS_SHA1}); the book is not at {BOOK_FILE}"


@pytest.fixture(autouse=True)
def signal_handlers_restored() -> Iterator[None]:
    """Each test ends with the SIGINT and SIGTERM handlers, and deeprnn's stop state, it started with: a
    command run in this process (typer's ``CliRunner``) installs deeprnn's stop handler for good, which would
    turn a later test's real Ctrl-C into a stop request instead of a ``KeyboardInterrupt``."""
    from deeprnn.training import stop_signals

    handlers = {signum: signal.getsignal(signum) for signum in stop_signals.STOP_SIGNALS}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    stop_signals._STATE = stop_signals._State()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> CorpusFile:
    """The book's file when it is here, else the stand-in written to the session's temporary folder."""
    if IS_BOOK:
        return CorpusFile(BOOK_FILE, CORPUS_SHA1, CORPUS_NUM_CHARS, CORPUS_NUM_BYTES, is_book=True)
    path = tmp_path_factory.mktemp("standin-corpus") / "timemachine.txt"
    path.write_bytes(STANDIN.encode("ascii"))
    assert hashlib.sha1(path.read_bytes()).hexdigest() == CORPUS_SHA1
    return CorpusFile(path, CORPUS_SHA1, CORPUS_NUM_CHARS, CORPUS_NUM_BYTES, is_book=False)


@pytest.fixture(scope="session")
def book_path(corpus_file: CorpusFile) -> Path:
    """The corpus file: the exact file the book downloads, or the stand-in when the book is not here."""
    return corpus_file.path


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output readable
        pass


@pytest.fixture(scope="session")
def corpus_server(book_path: Path) -> Iterator[str]:
    """Base URL of a real HTTP server on 127.0.0.1 serving the corpus's folder."""
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
    """URL of the corpus file on the local server."""
    return f"{corpus_server}/timemachine.txt"


@pytest.fixture(scope="session")
def corpus(corpus_file: CorpusFile, book_url: str) -> Corpus:
    """The corpus with its URL: pass ``corpus.sha1`` wherever a run is given the expected SHA-1."""
    return Corpus(**{**corpus_file.__dict__, "url": book_url})


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MB filesystem (tmpfs), mounted for the test and unmounted after it; needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
