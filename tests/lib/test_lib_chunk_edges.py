"""deeprnn.data.chunk_edges: a text normalized piece by piece gives the tokens of the whole text, whatever the chunk
edges cut (a line, a word, a run of spaces, a final sigma), and holds back only a little of each chunk."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest

from deeprnn.config import DataConfig
from deeprnn.data import prepare as prep
from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
from deeprnn.data.chunk_edges import MAX_WORD_CHARS, CharPieces, WordPieces, WordTooLongError
from deeprnn.data.download import fetch_corpus
from deeprnn.data.normalize import normalize_chars, normalize_words
from deeprnn.data.vocab import Vocab

# Letters, runs of spaces, every kind of line break, non-ASCII letters, and what Unicode's final-sigma rule
# looks across (an apostrophe, a full stop, a combining accent) beside capital sigmas.
ALPHABET = ["a", "B", "z", " ", "  ", "\n", "\r", "\r\n", ",", "é", "时", "\u03a3", "'", ".", "\u0301", "\t", "7"]


def _pieces(text: str, rng: random.Random, most: int) -> list[str]:
    """``text`` cut at random places, pieces of 1 to ``most`` characters."""
    cuts, at = [], 0
    while at < len(text):
        step = rng.randint(1, most)
        cuts.append(text[at : at + step])
        at += step
    return cuts


def _chars_in_pieces(text: str, mode: str, rng: random.Random, most: int) -> str:
    pieces = CharPieces(mode)
    out = [pieces.feed(chunk) for chunk in _pieces(text, rng, most)] + [pieces.finish()]
    return "".join(chr(c) for part in out for c in part.tolist())


def _words_in_pieces(text: str, mode: str, rng: random.Random, most: int) -> list[str]:
    pieces = WordPieces(mode)
    return [w for chunk in _pieces(text, rng, most) for w in pieces.feed(chunk)] + pieces.finish()


def _book(text: str, token: str) -> list[str]:
    return flatten(tokenize(preprocess_lines(text), token))


@pytest.mark.parametrize("newlines", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_pieces_equal_the_whole_text_at_every_chunk_edge(seed: int, newlines: bool) -> None:
    rng = random.Random(seed)
    letters = ALPHABET if newlines else [a for a in ALPHABET if "\n" not in a and "\r" not in a]
    for _ in range(300):
        text = "".join(rng.choice(letters) for _ in range(rng.randint(0, 80)))
        most = rng.choice([1, 2, 3, 7, 40])
        assert _chars_in_pieces(text, "d2l", rng, most) == "".join(_book(text, "char")), repr(text)
        assert _words_in_pieces(text, "d2l", rng, most) == _book(text, "word"), repr(text)
        for mode in ("none", "lower"):
            whole = "".join(chr(c) for c in normalize_chars(text, mode).tolist())
            assert _chars_in_pieces(text, mode, rng, most) == whole, (mode, text)
            assert _words_in_pieces(text, mode, rng, most) == normalize_words(text, mode), (mode, text)


def test_a_final_sigma_cut_from_its_word_is_still_final() -> None:
    text = "ΟΔΟΣ ΟΔΟΣ'Α Σ.Σ ΟΔΟΣ\u0301."  # whole: "οδος οδοσ'α σ.ς οδος\u0301."
    for cut in range(1, len(text)):
        pieces = CharPieces("lower")
        got = [pieces.feed(text[:cut]), pieces.feed(text[cut:]), pieces.finish()]
        assert "".join(chr(c) for part in got for c in part.tolist()) == text.lower(), cut


@pytest.mark.parametrize("mode", ["d2l", "none", "lower"])
def test_a_text_without_line_breaks_is_normalized_as_it_comes(mode: str) -> None:
    rng = random.Random(1)
    text = "".join(rng.choice(["The ", "time ", "traveller, ", "Σ", "said: "]) for _ in range(20_000))
    chunks = [text[at : at + 1000] for at in range(0, len(text), 1000)]
    pieces = CharPieces(mode)
    for chunk in chunks:
        out = pieces.feed(chunk)
        # Each chunk gives its tokens now: nothing waits for a line to end.
        assert out.size > len(chunk) // 2 and len(pieces.tail) < 10 and pieces.gap.size <= 1
    words = WordPieces(mode)
    for chunk in chunks:
        assert len(words.feed(chunk)) > 50 and len(words.tail) < 20


def test_a_word_longer_than_a_vocabulary_holds_is_refused() -> None:
    pieces = WordPieces("none")
    with pytest.raises(WordTooLongError, match=r"more than 1,048,576 characters \(no whitespace.*--token char"):
        for _ in range(MAX_WORD_CHARS // 1000 + 2):
            pieces.feed("x" * 1000)


def _prepared(tmp_path: Path, name: str, data: bytes, chunk_bytes: int, **fields: object) -> prep.PreparedCorpus:
    path = tmp_path / name
    path.write_bytes(data)
    return prep.prepare(fetch_corpus(str(path)), DataConfig(**fields), tmp_path / "cache", chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", [5, 64, 1 << 24])
def test_prepare_of_one_long_line_gives_the_books_ids(tmp_path: Path, chunk_bytes: int) -> None:
    rng = random.Random(chunk_bytes)
    text = "".join(rng.choice(["The Time  Traveller", ", ", "--", " said:\t", "é", "  "]) for _ in range(3000))
    for name, data in (("line.txt", text.encode()), ("line.txt.gz", gzip.compress(text.encode(), mtime=0))):
        for token in ("char", "word"):
            tokens = _book(text, token)
            book = Vocab(tokens)
            got = _prepared(tmp_path, name, data, chunk_bytes, token=token)
            assert got.vocab().idx_to_token == book.idx_to_token, (name, token)
            assert np.array_equal(got.ids(), np.array(book.encode(tokens))), (name, token)
        for mode in ("none", "lower"):
            got = _prepared(tmp_path, name, data, chunk_bytes, normalize=mode)
            assert got.vocab().decode(got.ids().tolist()) == (text if mode == "none" else text.lower())
            words = _prepared(tmp_path, name, data, chunk_bytes, normalize=mode, token="word")
            assert words.vocab().decode(words.ids().tolist(), " ") == " ".join(normalize_words(text, mode))
