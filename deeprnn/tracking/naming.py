"""Names that say what ran: the MLflow run (and Prefect flow run) of a training, and the experiment of a corpus.

A run is named ``<preset>·<corpus>·<cell><layers>x<hidden>``, e.g. ``text·faust-1f3a9c2e·lstm2x256``, where
the corpus is its file name's stem and the first 8 hex digits of its SHA-1 (two versions of one file differ).
A model sized to its text is named ``...·lstm2xauto`` until the sizing stage decides its size, and then
renamed for the size it decided (both the MLflow run and the Prefect flow run).
Runs of the book go to the experiment ``deeprnn-train``; runs of any other text to ``deeprnn-<corpus>``
unless the user names one, so the MLflow UI lists each text's runs together.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from deeprnn.config import D2L_SHA1, RunConfig

BOOK_EXPERIMENT = "deeprnn-train"  # also the training flow's name, where runs have always gone
SEPARATOR = "\u00b7"  # a middle dot: reads as one name, and no file name or preset contains it


def corpus_stem(url: str) -> str:
    """The corpus file's name without its suffix, as a lower-case slug (``Faust I.txt`` -> ``faust-i``)."""
    stem = Path(unquote(urlsplit(url).path)).stem
    return re.sub(r"[^A-Za-z0-9]+", "-", stem).strip("-").lower()[:40] or "corpus"


def corpus_label(corpus_name: str, sha1: str | None) -> str:
    """``<stem>-<first 8 hex digits of the SHA-1>``, or the stem alone while the SHA-1 is not known."""
    return f"{corpus_name}-{sha1[:8]}" if sha1 else corpus_name


def run_name(config: RunConfig, corpus_name: str, sha1: str | None) -> str:
    """The MLflow run's name, e.g. ``text·faust-1f3a9c2e·lstm2x256`` (``corpus_name``: ``corpus_stem``'s). The
    model's shape is its cell, layers and hidden size; ``lstm2xauto`` while the size is still to be sized to
    the text (``model.size = "auto"``), so no name states a width the run may not train."""
    width = "auto" if config.model.size == "auto" else str(config.model.num_hiddens)
    model = f"{config.model.cell}{config.model.num_layers}x{width}"
    return SEPARATOR.join((config.preset, corpus_label(corpus_name, sha1), model))


def is_book(sha1: str | None) -> bool:
    """Whether these are the bytes of the book's corpus (The Time Machine, as D2L downloads it)."""
    return sha1 == D2L_SHA1


def experiment_name(corpus_name: str, sha1: str) -> str:
    """The experiment a corpus's runs go to unless the user names one: ``deeprnn-train`` for the book,
    ``deeprnn-<stem>-<sha1 prefix>`` for any other text (as its registered model is named)."""
    return BOOK_EXPERIMENT if is_book(sha1) else f"deeprnn-{corpus_label(corpus_name, sha1)}"
