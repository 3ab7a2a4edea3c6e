"""Counting and encoding a corpus's tokens chunk by chunk: what ``deeprnn.data.prepare`` streams a corpus through.

A counter sees the text once, in chunks cut anywhere (``deeprnn.data.chunk_edges`` normalizes them with the
tokens of the whole text), and remembers each token's count and first-seen position (the vocabulary's order
for ties); it then yields the token ids, chunk by chunk, for a vocabulary. Characters are counted and looked
up as numpy arrays of code points; words through a ``Counter``.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from deeprnn.data.chunk_edges import CharPieces, WordPieces
from deeprnn.data.normalize import PrepareError, letter_loss
from deeprnn.data.vocab import Vocab

CHUNK_BYTES = 1 << 24  # 16 MiB of text per step: a few hundred MB of working memory at most
MAX_DISTINCT_WORDS = 20_000_000  # a guard while counting: this many distinct words already take gigabytes
_UNICODE = 0x110000


class TooManyWordsError(PrepareError):
    """The text has more distinct words than a word vocabulary can hold in memory."""


class CharCounter:
    """Counts a text's characters chunk by chunk (after normalization), remembering first-seen order.

    With the book's rule the normalized text is ASCII, one byte per token, so it is also written to ``spill``
    on the way: encoding then reads those bytes back instead of reading and normalizing the corpus again.
    """

    def __init__(self, normalize: str, spill: Path | None = None) -> None:
        self.normalize = normalize
        self.counts = np.zeros(_UNICODE, dtype=np.int64)  # (0x110000,) one slot per code point
        self.raw = np.zeros(_UNICODE, dtype=np.int64) if normalize == "d2l" else None
        self.first_seen: dict[int, int] = {}  # code point -> position of its first occurrence
        self.num_tokens = 0
        self.spill = spill if normalize == "d2l" else None

    def count(self, text: Iterable[str]) -> None:
        """Count the characters of the text, fed in chunks (written to ``spill`` on the way, when there is one)."""
        with open(self.spill or os.devnull, "wb") as spill:
            for points in CharPieces(self.normalize, self.raw).normalized(text):
                counted = np.bincount(points)
                new = np.flatnonzero((counted > 0) & (self.counts[: counted.size] == 0))
                self.first_seen.update(_first_positions(points, new, self.num_tokens))
                self.counts[: counted.size] += counted
                self.num_tokens += int(points.size)
                spill.write(points.data)

    def token_freqs(self) -> dict[str, int]:
        """Each character's count, in first-seen order."""
        order = sorted(self.first_seen, key=self.first_seen.__getitem__)
        return {chr(cp): int(self.counts[cp]) for cp in order}

    def letter_loss(self) -> tuple[int, int]:
        """``(letters, dropped)``: the letters of the original text, and how many normalization dropped."""
        return letter_loss(self.raw if self.raw is not None else self.counts, self.normalize)

    def encoded(self, vocab: Vocab, dtype: np.dtype, text: Callable[[], Iterable[str]]) -> Iterator[np.ndarray]:
        """The token ids, chunk by chunk: a lookup table over code points, applied to the spilled normalized
        text when there is one, else to ``text()`` read and normalized again."""
        table = np.zeros(max(self.first_seen, default=0) + 1, dtype=dtype)  # unknown characters stay 0: <unk>
        for token, index in vocab.token_to_idx.items():
            if len(token) == 1 and ord(token) < table.size:
                table[ord(token)] = index
        if self.spill is None:
            for points in CharPieces(self.normalize).normalized(text()):
                yield table[points]
            return
        with open(self.spill, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                yield table[np.frombuffer(block, dtype=np.uint8)]
        self.spill.unlink()


class WordCounter:
    """Counts a text's words chunk by chunk; a ``Counter`` keeps first-seen order."""

    def __init__(self, normalize: str) -> None:
        self.normalize = normalize
        self.counts: collections.Counter[str] = collections.Counter()
        self.num_tokens = 0

    def count(self, text: Iterable[str]) -> None:
        """Count the words of the text, fed in chunks; refuse a text with more distinct words than memory holds."""
        for words in WordPieces(self.normalize).normalized(text):
            self.counts.update(words)
            self.num_tokens += len(words)
            if len(self.counts) > MAX_DISTINCT_WORDS:
                raise TooManyWordsError(
                    f"the text has more than {MAX_DISTINCT_WORDS:,} distinct words, more than a word vocabulary "
                    "can hold in memory: use --token char (or a smaller text); --min-freq drops rare words only "
                    "after counting them"
                )

    def token_freqs(self) -> dict[str, int]:
        """Each word's count, in first-seen order."""
        return self.counts

    def letter_loss(self) -> tuple[int, int]:
        """Word counts do not say which characters were dropped; nothing is reported for words."""
        return 0, 0

    def encoded(self, vocab: Vocab, dtype: np.dtype, text: Callable[[], Iterable[str]]) -> Iterator[np.ndarray]:
        """The token ids, chunk by chunk, of ``text()`` read and split again."""
        get = vocab.token_to_idx.get
        for words in WordPieces(self.normalize).normalized(text()):
            yield np.fromiter((get(w, 0) for w in words), dtype=dtype, count=len(words))


def _first_positions(points: np.ndarray, values: np.ndarray, offset: int) -> dict[int, int]:
    """Where each of ``values`` first occurs in ``points`` (plus ``offset``).

    Searches growing prefixes, since first occurrences are nearly always early: the whole chunk is sorted
    only when a value first shows up near its end.
    """
    wanted = set(values.tolist())
    found: dict[int, int] = {}
    start, size = 0, 1 << 16
    while wanted and start < points.size:
        uniq, first = np.unique(points[start : start + size], return_index=True)
        hits = {v: offset + start + i for v, i in zip(uniq.tolist(), first.tolist()) if v in wanted}
        found.update(hits)
        wanted -= hits.keys()
        start, size = start + size, size * 4
    return found
