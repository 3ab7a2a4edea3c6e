"""Normalizing a text piece by piece with exactly the tokens of the whole text, in memory bounded by the
chunk size whatever the length of its lines.

A corpus is read in chunks (``read_text_chunks``) that cut anywhere: inside a line, a word, a run of spaces.
The normalizers here hold back at most a short tail of each chunk, so that every piece they normalize ends
where the rule cannot look across:

* ``none``: nothing is held back; every character is a token on its own.
* ``lower``: ``str.lower`` maps each character alone except the capital sigma, which becomes the final ``ς``
  at the end of a word (Unicode's Final_Sigma condition looks across case-ignorable characters on either
  side). A piece ends between two characters that are neither a sigma nor case-ignorable, found from the
  end of the chunk backwards (a few characters in any real text).
* ``d2l`` characters: a piece ends just after a letter. The non-letters after it are only remembered as one
  space or one line break: all the book's rule needs of them (one space inside a line, nothing across lines).
* words: a piece ends just after a separator (whitespace; any non-letter for ``d2l``), so no word is cut.
  A word longer than ``MAX_WORD_CHARS`` is refused: a vocabulary cannot hold such a token anyway.

The concatenated results of ``feed`` and ``finish`` equal ``normalize_chars`` / ``normalize_words`` of the
whole text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np

from deeprnn.data.normalize import PrepareError, code_points, d2l_collapse, d2l_translate, normalize_words

MAX_WORD_CHARS = 1 << 20  # a "word" this long is not language (minified JSON, base64): a vocabulary cannot hold it
_CAPITAL_SIGMA = "\u03a3"
_LF = 10
_LAST_SPACE = re.compile(r".*\s", re.S)  # \s is str.isspace, what str.split() splits at
_LAST_NON_LETTER = re.compile(r".*[^A-Za-z]", re.S)
_NOTHING = np.zeros(0, dtype=np.uint8)


class WordTooLongError(PrepareError):
    """The text has a word longer than a word vocabulary can hold."""


def _stops_sigma(c: str) -> bool:
    """Whether a cut beside ``c`` is invisible to the Final_Sigma rule: ``c`` is not a sigma, nor a character
    that ``str.lower``'s rule looks across. That is asked of Python itself: a sigma followed by such a ``c``
    then a space is final, and followed by ``c`` then a letter is not."""
    skipped = ("a\u03a3" + c + " ").lower()[1] == "\u03c2" and ("a\u03a3" + c + "b").lower()[1] == "\u03c3"
    return c != _CAPITAL_SIGMA and not skipped


def _gap(tail: np.ndarray, before: np.ndarray = _NOTHING) -> np.ndarray:
    """What the book's rule needs of non-letters (translated code points): nothing, one space or one line
    break (when any of them is a line break), joined with the ``before`` remembered so far."""
    if not tail.size:
        return before
    if (before.size and before[0] == _LF) or bool((tail < 32).any()):
        return np.array([_LF], dtype=np.uint8)
    return np.array([32], dtype=np.uint8)


class CharPieces:
    """The normalized code points of a text fed in chunks: ``feed`` every chunk in order, then ``finish``.

    With ``raw_counts`` (an int64 array indexed by code point), the code points of the text as given are
    counted into it on the way, as ``normalize_chars`` does.
    """

    def __init__(self, mode: str, raw_counts: np.ndarray | None = None) -> None:
        self.mode = mode
        self.raw_counts = raw_counts
        self.tail = ""  # lower: the characters held back for the next piece
        self.gap = _NOTHING  # d2l: the non-letters after the last letter, as one space or one line break
        self.after_letter = False  # d2l: a letter has been seen

    def feed(self, chunk: str) -> np.ndarray:
        """The normalized code points of as much of the text so far as can be decided now."""
        points = code_points(chunk)
        if self.raw_counts is not None and points.size:
            counted = np.bincount(points)
            self.raw_counts[: counted.size] += counted
        if self.mode == "none":
            return points
        if self.mode == "lower":
            text = self.tail + chunk
            # The last cut where lower-casing both sides equals lower-casing the whole: between two characters
            # that stop the Final_Sigma rule (0: none yet, all of it waits).
            stops = (p for p in range(len(text) - 1, 0, -1) if _stops_sigma(text[p]) and _stops_sigma(text[p - 1]))
            cut = next(stops, 0)
            self.tail = text[cut:]
            return code_points(text[:cut].lower())
        return self._feed_d2l(d2l_translate(points))

    def _feed_d2l(self, lowered: np.ndarray) -> np.ndarray:
        letters = lowered >= 97
        if not letters.any():
            self.gap = _gap(lowered, self.gap)
            return _NOTHING
        end = lowered.size - int(np.argmax(letters[::-1]))  # just after the last letter
        head = np.concatenate((self.gap, lowered[:end])) if self.gap.size else lowered[:end]
        out = d2l_collapse(head, continues=self.after_letter)
        self.gap, self.after_letter = _gap(lowered[end:]), True
        return out

    def finish(self) -> np.ndarray:
        """The rest, at the end of the text (for ``d2l`` nothing: the last non-letters end the last line)."""
        tail, self.tail = self.tail, ""
        return code_points(tail.lower()) if self.mode == "lower" else _NOTHING

    def normalized(self, text: Iterable[str]) -> Iterator[np.ndarray]:
        """``feed`` of every chunk of ``text``, then ``finish``."""
        for chunk in text:
            yield self.feed(chunk)
        yield self.finish()


class WordPieces:
    """The word tokens of a text fed in chunks: ``feed`` every chunk in order, then ``finish``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.last_separator = _LAST_NON_LETTER if mode == "d2l" else _LAST_SPACE
        self.tail = ""  # the start of a word that may go on in the next chunk

    def feed(self, chunk: str) -> list[str]:
        """The words of the text so far that are certainly whole."""
        text = self.tail + chunk
        found = self.last_separator.match(text)
        end = found.end() if found else 0
        self.tail = text[end:]
        if len(self.tail) > MAX_WORD_CHARS:
            separator = "a character other than a letter" if self.mode == "d2l" else "whitespace"
            raise WordTooLongError(
                f"the text has a word of more than {MAX_WORD_CHARS:,} characters (no {separator} in that many), "
                "more than a word vocabulary can hold: use --token char"
            )
        return normalize_words(text[:end], self.mode) if end else []

    def finish(self) -> list[str]:
        """The last word, at the end of the text."""
        tail, self.tail = self.tail, ""
        return normalize_words(tail, self.mode)

    def normalized(self, text: Iterable[str]) -> Iterator[list[str]]:
        """``feed`` of every chunk of ``text``, then ``finish``."""
        for chunk in text:
            yield self.feed(chunk)
        yield self.finish()
