"""deeprnn.data.book_tokenize: the book's preprocessing (D2L 8.2), on tiny text and against d2l on the real corpus."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize


def _book_lines(path: Path) -> list[str]:
    """What the book's ``read_time_machine`` does to a file (its code, minus the download)."""
    with open(path, "r") as f:
        lines = f.readlines()
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def test_preprocess_keeps_letters_lowercased_and_stripped() -> None:
    text = "The Time Machine, by H. G. Wells [1898]\n\n   I  \nIt's 3 o'clock -- ALREADY!\n"
    assert preprocess_lines(text) == ["the time machine by h g wells", "", "i", "it s o clock already"]


def test_preprocess_collapses_runs_of_non_letters_into_one_space() -> None:
    assert preprocess_lines("a,,, b\t\tc123d\n") == ["a b c d"]


def test_preprocess_drops_non_ascii_letters_like_the_book() -> None:
    # The book's regex is [^A-Za-z]+: accented letters are separators, not letters.
    assert preprocess_lines("caf\u00e9 na\u00efve\n") == ["caf na ve"]


def test_preprocess_one_entry_per_line_with_or_without_final_newline() -> None:
    assert preprocess_lines("a\nb") == ["a", "b"]
    assert preprocess_lines("a\nb\n") == ["a", "b"]
    assert preprocess_lines("a\r\nb\r\n") == ["a", "b"]
    assert preprocess_lines("") == []


def test_char_and_word_tokens() -> None:
    lines = ["the time", "", "machine"]
    assert tokenize(lines, "char") == [list("the time"), [], list("machine")]
    assert tokenize(lines, "word") == [["the", "time"], [], ["machine"]]
    assert tokenize(lines) == tokenize(lines, "char")  # characters by default, as in 9.3


def test_unknown_token_type_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown token type 'byte'"):
        tokenize(["abc"], "byte")  # type: ignore[arg-type]


def test_flatten_joins_lines_without_separator() -> None:
    assert flatten([["a", "b"], [], ["c"]]) == ["a", "b", "c"]
    assert flatten([]) == []
    assert "".join(flatten(tokenize(["the end", "i"], "char"))) == "the endi"


def test_preprocess_keeps_ascii_letters_of_utf8_text() -> None:
    assert preprocess_lines("Caf\u00e9 AU LAIT\nline 2\n") == ["caf au lait", "line"]


def test_preprocess_equals_the_books_read_time_machine(book_path: Path) -> None:
    assert preprocess_lines(book_path.read_text(encoding="utf-8")) == _book_lines(book_path)


@pytest.mark.parametrize("sep", ["\x0c", "\x0b", "\x85", "\u2028"])
def test_preprocess_splits_lines_exactly_where_the_book_does(tmp_path: Path, sep: str) -> None:
    text = f"end of chapter one{sep}CHAPTER TWO\nnext line\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    assert preprocess_lines(text) == _book_lines(path)
