"""Stage 2: text -> lines -> tokens, exactly as the book does it (D2L 8.2)."""

from __future__ import annotations

import io
import re
from typing import Callable, Literal

_NON_LETTERS = re.compile("[^A-Za-z]+")


def preprocess_lines(text: str) -> list[str]:
    """Keep letters only, lower-cased, one entry per line (the book's ``read_time_machine``)."""
    # Lines split as the book's ``open(...).readlines()`` splits them (\n, \r, \r\n only): str.splitlines
    # would also break at \f, \x85, \u2028 and others, which the book keeps inside a line.
    lines = io.StringIO(text, newline=None).readlines()
    return [_NON_LETTERS.sub(" ", line).strip().lower() for line in lines]


def tokenize(lines: list[str], token: Literal["char", "word"] = "char") -> list[list[str]]:
    """Split each line into characters or words (the book's ``tokenize``)."""
    split: dict[str, Callable[[str], list[str]]] = {"word": str.split, "char": list}
    if token not in split:
        raise ValueError(f"unknown token type {token!r}; use 'char' or 'word'")
    return [split[token](line) for line in lines]


def flatten(tokens: list[list[str]]) -> list[str]:
    """All tokens in order, lines joined with no separator (as the book's corpus is)."""
    return [tok for line in tokens for tok in line]
