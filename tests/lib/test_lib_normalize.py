"""deeprnn.data.normalize: the vectorized normalizations against the book's own list-of-strings rule."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
from deeprnn.data.chunk_edges import CharPieces
from deeprnn.data.normalize import code_points, letter_loss, normalize_chars, normalize_prefix, normalize_words

TRICKY = "aB c\n\r\t,.-Zé\u2028\x0c  xy\u00dcber 3"


def _book_chars(text: str) -> str:
    return "".join(flatten(tokenize(preprocess_lines(text), "char")))


def _book_words(text: str) -> list[str]:
    return flatten(tokenize(preprocess_lines(text), "word"))


def _text(points: np.ndarray) -> str:
    return "".join(map(chr, points.tolist()))


@pytest.mark.parametrize("seed", range(5))
def test_d2l_chars_equal_the_books_rule_on_random_text(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(400):
        text = "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 60)))
        assert _text(normalize_chars(text, "d2l")) == _book_chars(text), repr(text)
        assert normalize_words(text, "d2l") == _book_words(text), repr(text)


def test_d2l_on_the_whole_book_equals_the_book(book_path: Path) -> None:
    text = book_path.read_text(encoding="utf-8")
    assert _text(normalize_chars(text, "d2l")) == _book_chars(text)
    assert normalize_words(text, "d2l") == _book_words(text)


def test_d2l_drops_what_the_issue_shows_and_none_keeps_it() -> None:
    german = "Über die Brücke gingen die Mädchen.\n"
    assert _text(normalize_chars(german, "d2l")) == "ber die br cke gingen die m dchen"
    assert _text(normalize_chars(german, "none")) == german  # every character, the newline too
    assert _text(normalize_chars(german, "lower")) == german.lower()
    chinese = "时间机器，是一部小说。\n第二行"
    assert normalize_chars(chinese, "d2l").size == 0
    assert _text(normalize_chars(chinese, "none")) == chinese
    assert normalize_words("Hello, World!\nbye", "none") == ["Hello,", "World!", "bye"]
    assert normalize_words("Hello, World!\nbye", "lower") == ["hello,", "world!", "bye"]


def test_code_points_are_bytes_for_ascii_and_utf32_otherwise() -> None:
    assert code_points("abc").dtype == np.uint8
    assert code_points("abc").tolist() == [97, 98, 99]
    wide = code_points("a\u00fc\U0001f600")
    assert wide.dtype == np.uint32 and wide.tolist() == [97, 0xFC, 0x1F600]


def test_letter_loss_counts_the_letters_d2l_drops() -> None:
    raw = np.zeros(0x110000, dtype=np.int64)
    CharPieces("d2l", raw).feed("Über die Brücke: 1 ä\n")  # counts the text as given on the way
    assert letter_loss(raw, "d2l") == (14, 3)  # Ü, ü, ä (digits and punctuation are no letters)
    assert letter_loss(raw, "none") == (14, 0)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown normalization 'nfkc'"):
        normalize_chars("abc", "nfkc")
    with pytest.raises(ValueError, match="unknown normalization 'nfkc'"):
        normalize_words("abc", "nfkc")


@pytest.mark.parametrize(
    ("prefix", "mode", "token", "expected"),
    [
        ("The Time Traveller", "d2l", "char", "the time traveller"),
        ("  The Time-Traveller (for so...) ", "d2l", "char", "the time traveller for so"),
        ("\u00dcber die Br\u00fccke", "d2l", "char", "ber die br cke"),  # as the book's rule wrote the corpus
        ("#%&", "d2l", "char", ""),
        ("\u00dcber die Br\u00fccke", "lower", "char", "\u00fcber die br\u00fccke"),
        ("The Time Traveller!", "none", "char", "The Time Traveller!"),
        ("\u65f6\u7684\u4eba", "none", "char", "\u65f6\u7684\u4eba"),
        ("The  Time-Traveller!", "d2l", "word", "the time traveller"),
        ("The  Time-Traveller!", "none", "word", "The Time-Traveller!"),
    ],
)
def test_a_prefix_is_written_as_the_corpus_rule_writes_text(prefix: str, mode: str, token: str, expected: str) -> None:
    assert normalize_prefix(prefix, mode, token) == expected


@pytest.mark.parametrize("seed", range(3))
def test_a_prefix_normalizes_as_a_line_of_the_corpus_does(seed: int) -> None:
    rng = random.Random(seed)
    line = "".join(rng.choice(TRICKY.replace("\n", "").replace("\r", "")) for _ in range(60))
    for mode in ("d2l", "lower", "none"):
        assert normalize_prefix(line, mode) == _text(normalize_chars(line + "\n", mode)).rstrip("\n")
    assert normalize_prefix(line, "d2l") == _book_chars(line)  # the book's own rule, on one line
    assert normalize_prefix(normalize_prefix(line, "d2l"), "d2l") == normalize_prefix(line, "d2l")
