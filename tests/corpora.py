"""The corpus the tests train on: the book's file, or a generated stand-in of about its size.

The stand-in is a deterministic English-like text (a seeded choice over a word list with every letter a-z, so
the book's 28-token character vocabulary): sentences with punctuation and capitals, wrapped lines, numbered
chapters and a header line, as in the book's file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import re
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BOOK_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
BOOK_NUM_CHARS = 170_580  # characters after the book's preprocessing (D2L 8.2)
BOOK_NUM_BYTES = 178_979
BOOK_MODEL = "deeprnn-lm"  # the registered model of the book's corpus

# Words of the book's register, every letter a-z among them (j, q, x and z included).
_WORDS = (
    "the time traveller machine and of a to in was it that he i his with for as had you at but on we is my not"
    " be me there this so from which they all were one said have upon little people seemed came into our now"
    " or what some could very then like would out when been thing about light felt more world saw down sun"
    " night under strange over again before through still eyes began white great hand found way face thought"
    " these last think dark side green small hill things long see first must went away old air creatures quite"
    " just quickly jump joy judge queer quiet question quarter box fox six next vexed lazy zero dozen amazed"
    " blaze frozen puzzled weena morlocks eloi sphinx bronze pedestal lever dinner filby psychologist medical"
    " man future fourth dimension space geometry sleep fire match candle garden palace porcelain"
).split()
_NUMERALS = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV", "XV", "XVI"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
    for i in range(1, len(words) - 1):
        if rng.random() < 0.08:
            words[i] += rng.choice([",", ",", ";", "--"])
    text = " ".join(words)
    text = text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"])
    return f"'{text}'" if rng.random() < 0.1 else text


def _wrap(text: str, width: int = 68) -> str:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line])


def standin_text(num_bytes: int = 180_000, seed: int = 93) -> str:
    """A deterministic English-like text: a header, numbered chapters, paragraphs of wrapped sentences."""
    rng = random.Random(seed)
    parts = ["The Time Machine, a Generated Stand-in [1898]\n\n\n\n\n"]
    size, chapter = len(parts[0]), 0
    while size < num_bytes:
        if size >= chapter * num_bytes // len(_NUMERALS):
            parts.append(f"{_NUMERALS[chapter]}\n\n\n")
            chapter += 1
        paragraph = _wrap(" ".join(_sentence(rng) for _ in range(rng.randint(2, 9)))) + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)


def d2l_num_chars(text: str) -> int:
    """How many character tokens D2L 8.2's ``read_time_machine`` + ``tokenize`` make of ``text``: its own regex
    and ``readlines()`` (universal newlines, as ``open`` reads), independent of deeprnn's code."""
    lines = io.StringIO(text, newline=None).readlines()
    return sum(len(re.sub("[^A-Za-z]+", " ", line).strip()) for line in lines)


@dataclass(frozen=True)
class CorpusFile:
    """The file the tests train on: the book's, or the generated stand-in (``is_book`` False)."""

    path: Path
    sha1: str
    num_chars: int
    num_bytes: int
    is_book: bool

    @property
    def registered_model(self) -> str:
        """The registered model deeprnn names for this corpus when the user names none."""
        return registered_model(self.sha1, self.is_book)


@dataclass(frozen=True)
class Corpus(CorpusFile):
    """The corpus file and its URL on the local HTTP server."""

    url: str = ""


def registered_model(sha1: str, is_book: bool) -> str:
    """``deeprnn-lm`` for the book; for another file, its name and SHA-1 (README, "Your own text")."""
    return BOOK_MODEL if is_book else f"deeprnn-timemachine-{sha1[:8]}"


# The book's folder: DEEPRNN_TEST_DATA (.ci/run sets it to ../shared/data), else the shared folder beside the
# checkout. The figures below are known when test modules are imported, for their module-level constants.
SHARED_DATA = Path(os.environ.get("DEEPRNN_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
BOOK_FILE = SHARED_DATA / "timemachine.txt"
IS_BOOK = BOOK_FILE.is_file()
STANDIN = "" if IS_BOOK else standin_text()
# On the book the book's own constants (so every assertion stays as strict); else the stand-in's figures.
CORPUS_SHA1 = BOOK_SHA1 if IS_BOOK else hashlib.sha1(STANDIN.encode("ascii")).hexdigest()
CORPUS_NUM_CHARS = BOOK_NUM_CHARS if IS_BOOK else d2l_num_chars(STANDIN)
CORPUS_NUM_BYTES = BOOK_NUM_BYTES if IS_BOOK else len(STANDIN.encode("ascii"))
CORPUS_MODEL = registered_model(CORPUS_SHA1, IS_BOOK)


class CountingServer:
    """A real HTTP server on 127.0.0.1 serving the corpus's folder; ``hits`` lists the paths asked for."""

    def __init__(self, folder: Path) -> None:
        hits: list[str] = []
        self.hits = hits

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                hits.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        """The URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _train_experiment() -> str:
    """The experiment a training run of this corpus goes to by default: the book's ``deeprnn-train``, or the
    stand-in's own (runs of any other text go to an experiment named after it)."""
    from deeprnn.tracking.naming import experiment_name

    return experiment_name("timemachine", CORPUS_SHA1)


TRAIN_EXPERIMENT = _train_experiment()
