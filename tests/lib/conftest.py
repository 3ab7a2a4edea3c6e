"""Fixtures for the library tests: tiny in-memory text, the corpus's tokens, the book's own d2l code, an HTTP server.

Test files here are named ``test_lib_*.py`` so that their module names cannot collide with tests elsewhere
under ``tests/`` (there are no ``__init__.py`` files, so pytest imports test modules by their base name).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import random
import shutil
import sys
import threading
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import torch
from corpora import CorpusFile
from ports import free_port

from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
from deeprnn.data.vocab import Vocab

# A few lines in the book's style: enough text for several minibatches of a tiny model, in milliseconds.
TINY_TEXT = (
    "The Time Machine, by H. G. Wells [1898]\n"
    "\n"
    "I\n"
    "The Time Traveller (for so it will be convenient to speak of him)\n"
    "was expounding a recondite matter to us. His grey eyes shone and\n"
    "twinkled, and his usually pale face was flushed and animated.\n"
) * 8


# ----- the corpus (the book's, or the generated stand-in: tests/corpora.py) -------------------------


@pytest.fixture(scope="session")
def book_tokens(book_path: Path) -> list[str]:
    """The corpus as a flat list of characters, preprocessed as the book does."""
    return flatten(tokenize(preprocess_lines(book_path.read_text(encoding="utf-8")), "char"))


@pytest.fixture(scope="session")
def book_vocab(book_tokens: list[str]) -> Vocab:
    return Vocab(book_tokens)


@pytest.fixture()
def d2l_data_dir(
    d2l: types.ModuleType, corpus_file: CorpusFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Arrange ``../data/timemachine.txt`` for d2l (it checks the sha1 and then stays offline) and chdir there.

    The copy lives in pytest's temporary folder, never in the project. d2l's registry is told the corpus's
    SHA-1 (the book's own on the book, so unchanged there), else it would download the book over the stand-in.
    """
    data = tmp_path / "data"
    work = tmp_path / "work"
    data.mkdir()
    work.mkdir()
    shutil.copy(corpus_file.path, data / "timemachine.txt")
    url, _ = d2l.DATA_HUB["time_machine"]
    monkeypatch.setitem(d2l.DATA_HUB, "time_machine", (url, corpus_file.sha1))
    monkeypatch.chdir(work)
    return data


# ----- tiny in-memory text --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return TINY_TEXT


@pytest.fixture(scope="session")
def tiny_tokens() -> list[str]:
    return flatten(tokenize(preprocess_lines(TINY_TEXT), "char"))


@pytest.fixture(scope="session")
def tiny_vocab(tiny_tokens: list[str]) -> Vocab:
    return Vocab(tiny_tokens)


@pytest.fixture()
def tiny_ids(tiny_tokens: list[str], tiny_vocab: Vocab) -> torch.Tensor:
    return torch.tensor(tiny_vocab.encode(tiny_tokens), dtype=torch.long)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and a busy 2-core runner makes several threads spin: use one here.

    Restored after each test, so tests outside this folder keep torch's own setting.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def restore_global_random():
    """Put Python's global ``random`` state back after a test that seeds it."""
    state = random.getstate()
    yield
    random.setstate(state)


# ----- the book's own code (d2l 0.17.6) -------------------------------------------------------------

_STUBBED = [
    "torchvision",
    "torchvision.transforms",
    "PIL",
    "PIL.Image",
    "IPython",
    "IPython.display",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib_inline",
    "matplotlib_inline.backend_inline",
    "pandas",
]
_CHILDREN = [
    ("torchvision", "transforms"),
    ("PIL", "Image"),
    ("IPython", "display"),
    ("matplotlib", "pyplot"),
    ("matplotlib_inline", "backend_inline"),
]


@pytest.fixture(scope="session")
def d2l() -> types.ModuleType:
    """``d2l.torch`` from d2l 0.17.6, with its plotting/vision imports stubbed when they are not installed.

    Same logic as ``shared/bench/d2l_reference.py``. The stubs are taken out of ``sys.modules`` again once d2l
    is imported, so no other test sees a fake ``torchvision`` or ``IPython``.
    """
    if importlib.util.find_spec("d2l") is None:
        pytest.skip("d2l is not installed (pip install --no-deps d2l==0.17.6)")
    stubs: list[str] = []
    for name in _STUBBED:
        if name not in sys.modules:
            try:
                __import__(name)
            except Exception:
                stub = types.ModuleType(name)
                stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
                sys.modules[name] = stub
                stubs.append(name)
    for parent, child in _CHILDREN:
        if not hasattr(sys.modules[parent], child):
            setattr(sys.modules[parent], child, sys.modules[f"{parent}.{child}"])
    try:
        module = importlib.import_module("d2l.torch")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return module


# ----- a local HTTP server --------------------------------------------------------------------------


@dataclass
class LocalServer:
    """Serves ``routes[path] = (status, body)``; every other path gets ``default`` (404 when None)."""

    server: ThreadingHTTPServer
    thread: threading.Thread
    routes: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    default: tuple[int, bytes] | None = None
    hits: list[str] = field(default_factory=list)
    running: bool = True

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def serve(self, path: str, body: bytes, status: int = 200) -> str:
        self.routes[path] = (status, body)
        return self.url(path)

    def stop(self) -> None:
        if self.running:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.running = False


@pytest.fixture()
def http_server() -> LocalServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (a free port), stopped after the test."""
    holder: dict[str, LocalServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            srv = holder["srv"]
            srv.hits.append(self.path)
            status, body = srv.routes.get(self.path, srv.default or (404, b"not found"))
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    srv = LocalServer(server, thread)
    holder["srv"] = srv
    thread.start()
    yield srv
    srv.stop()


@pytest.fixture()
def closed_port_url() -> Callable[[str], str]:
    """A URL on 127.0.0.1 whose port nobody listens on (connection refused)."""

    def make(path: str = "/corpus.txt") -> str:
        return f"http://127.0.0.1:{free_port()}{path}"

    return make
