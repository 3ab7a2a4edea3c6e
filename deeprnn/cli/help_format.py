"""Help that reads the same at 80 columns, in a terminal, a pipe or a CI log: click's plain layout (option
names whole, descriptions beside them or on the next line), with words never broken: a URL, a path or a name
such as ``models:/deeprnn-lm@champion`` wraps as a whole, at a space."""

from __future__ import annotations

import re
import textwrap
from typing import Sequence

import typer
import typer.core

# Typer's plain help names a type by its Python spelling (<int>, <float range>); click's words read better.
METAVARS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "list[str]": "TEXT"}
_METAVAR = re.compile(r"<(str|int|float|list\[str\])(?: range)?>")


def wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters where it can be, broken only at spaces."""
    return textwrap.wrap(text, max(width, 20), break_long_words=False, break_on_hyphens=False) or [""]


class HelpFormatter(typer.Context.formatter_class):  # type: ignore[misc,name-defined]  # click's, as Typer ships it
    """Click's help layout, wrapping at spaces only."""

    def write_text(self, text: str) -> None:
        """Each paragraph of ``text`` wrapped to the width, at the current indent."""
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
        wrapped = ["\n".join(wrap(p, self.width - self.current_indent)) for p in paragraphs]
        self.write(textwrap.indent("\n\n".join(wrapped), " " * self.current_indent) + "\n")

    def write_dl(self, rows: Sequence[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        """Two columns: each name, and its text beside it (or on the next line when the name is longer)."""
        rows = [(_METAVAR.sub(lambda m: METAVARS[m.group(1)], name), text) for name, text in rows]
        first = min(max((len(name) for name, _ in rows), default=0), col_max) + col_spacing
        indent = " " * self.current_indent
        for name, text in rows:
            self.write(indent + name)
            lines = wrap(" ".join(text.split()), self.width - first - len(indent)) if text else []
            if lines and len(name) + col_spacing <= first:  # the text's first line beside the name
                self.write(" " * (first - len(name)) + lines.pop(0))
            self.write("\n" + "".join(indent + " " * first + line + "\n" for line in lines))


class Context(typer.Context):
    """A click context whose help uses ``HelpFormatter``."""

    formatter_class = HelpFormatter


class Group(typer.core.TyperGroup):
    """The ``deeprnn`` command group, with ``HelpFormatter``'s help."""

    context_class = Context


class Command(typer.core.TyperCommand):
    """A ``deeprnn`` subcommand, with ``HelpFormatter``'s help."""

    context_class = Context
