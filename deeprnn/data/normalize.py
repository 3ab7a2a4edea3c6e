"""Stage 2: how text becomes tokens. The normalization rule is a data setting (``data.normalize``):

* ``d2l``: the book's rule (D2L 8.2 ``read_time_machine``). In every line each run of characters other than
  ``A-Z``/``a-z`` becomes one space, the line is stripped and lower-cased, and the lines are joined with no
  separator. Lines end at ``\\n``, ``\\r`` or ``\\r\\n`` only, as Python's ``readlines`` splits them.
* ``lower``: every character kept, lower-cased (Unicode's ``str.lower``).
* ``none``: every character kept exactly: case, punctuation, digits, newlines (char-rnn's behaviour).

Everything here works on a whole text and is vectorized with numpy over Unicode code points;
``deeprnn.data.chunk_edges`` applies it to a corpus of any size piece by piece, cutting where the pieces cannot
differ from the whole. ``deeprnn.data.book_tokenize`` keeps the book's own list-of-strings functions as the
reference these must equal.
"""

from __future__ import annotations

import re

import numpy as np

NORMALIZE_MODES: tuple[str, ...] = ("d2l", "lower", "none")
_NON_LETTERS = re.compile("[^A-Za-z]+")
_SPACE, _LF, _CR = 32, 10, 13


class PrepareError(ValueError):
    """The corpus cannot be turned into training tokens with these settings; the message says what to change."""


def check_mode(mode: str) -> None:
    """Refuse a normalization that is none of ``NORMALIZE_MODES``, naming them."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalization {mode!r}; use one of {', '.join(NORMALIZE_MODES)}")


def code_points(text: str) -> np.ndarray:
    """The code points of ``text``: ``uint8`` for ASCII text (no copy through UTF-32), else ``uint32``."""
    if text.isascii():  # O(1) in CPython: a flag on the string
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def normalize_chars(text: str, mode: str) -> np.ndarray:
    """The code points of ``text`` (a whole text) after normalization ``mode``; one code point per token."""
    check_mode(mode)
    points = code_points(text.lower() if mode == "lower" else text)
    return d2l_collapse(d2l_translate(points)) if mode == "d2l" else points


# A ``bytes.translate`` table: ASCII letters lower-cased, line breaks kept, any other byte a space.
_D2L_TABLE = bytes(
    ord(chr(c).lower()) if chr(c).isascii() and chr(c).isalpha() else c if c in (_LF, _CR) else _SPACE
    for c in range(256)
)


def d2l_translate(points: np.ndarray) -> np.ndarray:
    """The book's rule character by character: letters lower-cased, line breaks (LF, CR) kept, anything else a
    space. Returns ASCII (uint8) code points."""
    if points.dtype != np.uint8:
        points = np.minimum(points, 127).astype(np.uint8)  # every non-ASCII character is a separator, like DEL
    return np.frombuffer(points.tobytes().translate(_D2L_TABLE), dtype=np.uint8)  # (N,) a-z, space, CR, LF


def d2l_collapse(lowered: np.ndarray, continues: bool = False) -> np.ndarray:
    """The book's rule on translated code points (``d2l_translate``): each run of non-letters between two
    letters of the same line becomes one space; runs at a line's start or end are dropped, and lines are
    joined with no separator.

    ``continues``: a letter of the same line comes just before ``lowered`` (it is a piece of a longer text),
    so a run at its very start is inside a line, not at a line's start. A run at its end always ends a line.
    """
    letter = lowered >= 97  # only a-z are that high after the translation
    other = ~letter
    # Runs of non-letters: where each starts, and whether it holds a line break.
    starts = np.flatnonzero(other & np.concatenate(([True], letter[:-1])))  # (R,)
    if starts.size == 0:
        return lowered
    breaks = np.flatnonzero(lowered < _SPACE)  # (K,) the line breaks: the only characters below a space now
    has_break = np.zeros(starts.size, dtype=bool)
    has_break[np.searchsorted(starts, breaks, side="right") - 1] = True  # the run each break falls in
    inside = ~has_break if continues else (starts > 0) & ~has_break
    if other[-1]:
        inside[-1] = False  # a run that reaches the end ends its last line
    keep = letter.copy()
    keep[starts[inside]] = True  # the first character of an in-line run stands for the run: one space
    return lowered[keep]


def normalize_words(text: str, mode: str) -> list[str]:
    """The word tokens of ``text`` (a whole text) after normalization ``mode``: whitespace-separated words,
    with the book's letters-only rule for ``d2l``."""
    check_mode(mode)
    if mode == "d2l":
        text = _NON_LETTERS.sub(" ", text)
    return (text if mode == "none" else text.lower()).split()


def letter_loss(raw_counts: np.ndarray, mode: str) -> tuple[int, int]:
    """``(letters, dropped)``: the letters (Unicode ``str.isalpha``) of a text whose code points occur
    ``raw_counts[cp]`` times, and how many of them ``mode`` drops.

    Only ``d2l`` drops letters (every letter outside a-z/A-Z); ``none`` and ``lower`` keep them all.
    """
    alpha = [int(cp) for cp in np.flatnonzero(raw_counts) if chr(int(cp)).isalpha()]
    dropped = int(raw_counts[[cp for cp in alpha if cp >= 128]].sum()) if mode == "d2l" else 0
    return int(raw_counts[alpha].sum()), dropped


def normalize_prefix(prefix: str, mode: str, token: str = "char") -> str:
    """A prefix to continue, as the corpus's own rule ``mode`` would have written it: what the model was
    trained on (``d2l``: ``"The Time-Traveller!"`` -> ``"the time traveller"``; ``none``: unchanged). Words
    (``token="word"``) are rejoined with single spaces. May be empty (nothing the rule keeps)."""
    if token == "word":
        return " ".join(normalize_words(prefix, mode))
    points = normalize_chars(prefix, mode)
    return points.astype("<u4").tobytes().decode("utf-32-le")
