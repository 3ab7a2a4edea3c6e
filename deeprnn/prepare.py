"""Stage 3: tokenize a corpus once and keep its token ids on disk (the prepared token cache).

Like nanoGPT's ``prepare.py`` (a ``train.bin`` memory map beside a ``meta.pkl``) or torch-rnn's
``preprocess.py`` (an HDF5 array beside a JSON vocabulary), each prepared corpus is a folder::

    <cache>/tokens/<key>/
        ids.bin      every token id of the corpus, in order, as the smallest unsigned type that holds the
                     vocabulary (uint8 up to 256 tokens, then uint16, then uint32): memory-mappable
        vocab.json   the vocabulary (``Vocab.to_dict``)
        meta.json    what it was built from and a SHA-1 of ids.bin, checked on every use

``key`` is content-addressed: a hash of the corpus SHA-1 and every setting the ids depend on (token unit,
normalization, ``min_freq``, reserved tokens). Any other setting (splits, model, training) reuses the entry.
An entry whose files no longer match its ``meta.json`` is rebuilt. Entries are built in a temporary folder
and renamed into place, under a file lock, so concurrent runs (sweep trials) build each one once.

Building streams the corpus twice (count, then encode) in chunks of whole lines, vectorized with numpy over
code points, so memory stays bounded by the chunk size whatever the size of the text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from deeprnn.config import DataConfig
from deeprnn.download import CorpusFile, cache_dir, read_text_chunks
from deeprnn.token_counts import CHUNK_BYTES, CharCounter, TooManyWordsError, WordCounter, whole_lines
from deeprnn.vocab import Vocab

log = logging.getLogger(__name__)

FORMAT = "deeprnn-tokens/1"
MAX_VOCAB = 250_000  # beyond this the one-hot input and output layer of a model no longer fit in memory
WARN_LETTER_LOSS = 0.01  # warn when normalization drops more than this share of the text's letters


class PrepareError(ValueError):
    """The corpus cannot be turned into training tokens with these settings; the message says what to change."""


@dataclass(frozen=True)
class TokenSettings:
    """Everything besides the corpus bytes that the token ids depend on."""

    token: str
    normalize: str
    min_freq: int
    reserved_tokens: tuple[str, ...]

    @classmethod
    def of(cls, data: DataConfig) -> "TokenSettings":
        """The settings of a data configuration."""
        return cls(data.token, data.normalize, data.min_freq, tuple(data.reserved_tokens))

    def key(self, corpus_sha1: str) -> str:
        """The cache key of these settings on the corpus with ``corpus_sha1``."""
        text = json.dumps([FORMAT, corpus_sha1, self.token, self.normalize, self.min_freq, self.reserved_tokens])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def describe(self) -> dict[str, Any]:
        """JSON-ready form, as ``meta.json`` stores it."""
        return {
            "token": self.token,
            "normalize": self.normalize,
            "min_freq": self.min_freq,
            "reserved_tokens": list(self.reserved_tokens),
        }


@dataclass(frozen=True)
class PreparedCorpus:
    """A corpus's token ids on disk, its vocabulary, and how they were made."""

    folder: Path
    corpus_sha1: str
    settings: TokenSettings
    num_tokens: int
    vocab_size: int
    dtype: str  # numpy dtype name of ids.bin: uint8, uint16 or uint32
    letters: int  # letters in the text as given
    dropped_letters: int  # of those, letters the normalization removed
    build_seconds: float  # how long tokenizing took when the entry was built
    cache_hit: bool  # True when this call found the entry and tokenized nothing

    @property
    def ids_path(self) -> Path:
        """The memory-mappable token ids."""
        return self.folder / "ids.bin"

    @property
    def vocab_path(self) -> Path:
        """The vocabulary, as JSON."""
        return self.folder / "vocab.json"

    @property
    def dropped_share(self) -> float:
        """The share of the text's letters that normalization removed."""
        return self.dropped_letters / self.letters if self.letters else 0.0

    def ids(self) -> np.ndarray:
        """The token ids as a read-only-on-disk memory map (copy-on-write in memory; nothing is read yet)."""
        return np.memmap(self.ids_path, dtype=self.dtype, mode="c", shape=(self.num_tokens,))

    def vocab(self) -> Vocab:
        """The vocabulary the ids index."""
        return Vocab.load(self.vocab_path)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every index of a vocabulary of ``vocab_size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise PrepareError(f"a vocabulary of {vocab_size} tokens is too large")


def prepare(corpus: CorpusFile, data: DataConfig, cache: Path | None = None) -> PreparedCorpus:
    """The prepared token ids of ``corpus`` with ``data``'s tokenization settings: from the cache when a valid
    entry exists (nothing is tokenized), else tokenized now and cached.

    Raises ``PrepareError`` when the settings leave nothing to train on or a word vocabulary too large to hold.
    """
    from filelock import FileLock

    settings = TokenSettings.of(data)
    root = (cache if cache is not None else cache_dir()) / "tokens"
    folder = root / settings.key(corpus.sha1)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock", timeout=3600):  # one builder per entry; the others then read it
        found = _open_entry(folder)
        if found is not None:
            return found
        return _build_entry(corpus, settings, folder)


def _open_entry(folder: Path) -> PreparedCorpus | None:
    """The entry in ``folder`` if it is complete and its ids still match their hash; a damaged one is removed."""
    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
        prepared = _from_meta(folder, meta, cache_hit=True)
        expected = prepared.num_tokens * np.dtype(prepared.dtype).itemsize
        if prepared.ids_path.stat().st_size != expected:
            raise ValueError(f"ids.bin has {prepared.ids_path.stat().st_size} bytes, expected {expected}")
        if _sha1_of(prepared.ids_path) != meta["ids_sha1"]:
            raise ValueError("ids.bin does not match the SHA-1 in meta.json")
        if len(prepared.vocab()) != prepared.vocab_size:
            raise ValueError("vocab.json does not match meta.json")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("token cache entry %s is damaged (%s): preparing it again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return prepared


def _from_meta(folder: Path, meta: dict[str, Any], cache_hit: bool) -> PreparedCorpus:
    s = meta["settings"]
    settings = TokenSettings(s["token"], s["normalize"], int(s["min_freq"]), tuple(s["reserved_tokens"]))
    return PreparedCorpus(
        folder=folder,
        corpus_sha1=meta["corpus_sha1"],
        settings=settings,
        num_tokens=int(meta["num_tokens"]),
        vocab_size=int(meta["vocab_size"]),
        dtype=str(meta["dtype"]),
        letters=int(meta["letters"]),
        dropped_letters=int(meta["dropped_letters"]),
        build_seconds=float(meta["build_seconds"]),
        cache_hit=cache_hit,
    )


def _build_entry(corpus: CorpusFile, settings: TokenSettings, folder: Path) -> PreparedCorpus:
    """Tokenize ``corpus`` into a temporary folder beside ``folder``, then rename it into place."""
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))

    def text() -> Iterator[str]:
        return whole_lines(read_text_chunks(corpus, CHUNK_BYTES))

    try:
        if settings.token == "char":
            counter: CharCounter | WordCounter = CharCounter(settings.normalize, tmp / "normalized.tmp")
        else:
            counter = WordCounter(settings.normalize)
        try:
            for chunk in text():
                counter.add(chunk)
        except TooManyWordsError as exc:
            raise PrepareError(str(exc)) from None
        vocab = Vocab.from_counts(counter.token_freqs(), settings.min_freq, settings.reserved_tokens)
        _check_vocab(corpus, settings, counter, vocab)
        # Only the kept tokens' counts travel on (vocab.json, checkpoints): a word corpus may count millions.
        vocab.token_freqs = [(t, f) for t, f in vocab.token_freqs if f >= settings.min_freq]
        dtype = id_dtype(len(vocab))
        ids_sha1 = _write_ids(tmp / "ids.bin", counter.encoded(vocab, dtype, text))
        vocab.save(tmp / "vocab.json")
        loss = counter.letter_loss()
        meta = {
            "format": FORMAT,
            "corpus_sha1": corpus.sha1,
            "source": corpus.source,
            "settings": settings.describe(),
            "num_tokens": counter.num_tokens,
            "vocab_size": len(vocab),
            "dtype": dtype.name,
            "ids_sha1": ids_sha1,
            "letters": loss.letters,
            "dropped_letters": loss.dropped,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, folder)  # atomic: readers see the whole entry or none
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _from_meta(folder, meta, cache_hit=False)


def _write_ids(path: Path, chunks: Iterable[np.ndarray]) -> str:
    """Write the id chunks one after the other to ``path``; returns the SHA-1 of what was written."""
    digest = hashlib.sha1()
    with open(path, "wb") as fh:
        for ids in chunks:
            digest.update(ids.data)
            fh.write(ids.data)
    return digest.hexdigest()


def _check_vocab(
    corpus: CorpusFile, settings: TokenSettings, counter: "CharCounter | WordCounter", vocab: Vocab
) -> None:
    """Refuse settings that leave nothing to train on, or a vocabulary too large to hold in memory."""
    if counter.num_tokens == 0:
        rule = "the book's rule keeps only the letters a-z" if settings.normalize == "d2l" else "it has no tokens"
        raise PrepareError(
            f"{corpus.source} normalizes to nothing with --normalize {settings.normalize} ({rule}, and this text "
            "has none): use --normalize none to keep every character"
        )
    if len(vocab) > MAX_VOCAB:
        counts = np.array([f for _, f in counter.token_freqs()], dtype=np.int64)
        options = ", ".join(
            f"--min-freq {m} gives {int((counts >= m).sum()) + 1 + len(settings.reserved_tokens):,}"
            for m in (2, 5, 10, 50)
            if m > settings.min_freq
        )
        raise PrepareError(
            f"the {settings.token} vocabulary of {corpus.source} would hold {len(vocab):,} tokens with min_freq "
            f"{settings.min_freq}, more than the {MAX_VOCAB:,} a model can hold in memory (its input and output "
            f"layers grow with it): raise --min-freq ({options}) or use --token char"
        )


def _sha1_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def split_bounds(
    num_tokens: int, val_fraction: float, test_fraction: float, max_tokens: int | None
) -> tuple[int, int, int]:
    """``(train_end, val_start, test_start)``: the corpus is ``[train | val | test]`` by fractions, the test part
    at its end, and training keeps at most its first ``max_tokens`` (0 or None: all of it)."""
    test_start = num_tokens - int(round(num_tokens * test_fraction))
    val_start = test_start - int(round(num_tokens * val_fraction))
    train_end = min(val_start, max_tokens) if max_tokens else val_start
    return train_end, val_start, test_start


def split_sizes(prepared: PreparedCorpus, data: DataConfig) -> dict[str, int]:
    """How many tokens each split of ``prepared`` gets with ``data``'s fractions."""
    train_end, val_start, test_start = split_bounds(
        prepared.num_tokens, data.val_fraction, data.test_fraction, data.max_tokens
    )
    return {"train": train_end, "validation": test_start - val_start, "test": prepared.num_tokens - test_start}


def prepared_record(prepared: PreparedCorpus, data: DataConfig) -> dict[str, Any]:
    """What a prepared corpus holds, as JSON-ready data: its folder, whether this call found it in the cache,
    the corpus SHA-1, the vocabulary size and id type, and the tokens in all and per split of ``data``."""
    return {
        "folder": str(prepared.folder),
        "cache_hit": prepared.cache_hit,
        "corpus_sha1": prepared.corpus_sha1,
        "vocab_size": prepared.vocab_size,
        "dtype": prepared.dtype,
        "num_tokens": prepared.num_tokens,
        "splits": split_sizes(prepared, data),
    }


def prepared_summary(prepared: PreparedCorpus) -> str:
    """One line saying where the prepared tokens are and whether they were tokenized now."""
    what = (
        f"{prepared.num_tokens:,} {prepared.settings.token} tokens, vocabulary {prepared.vocab_size} ({prepared.dtype})"
    )
    if prepared.cache_hit:
        return f"token cache hit: {what} in {prepared.folder}; not tokenized again"
    return f"tokenized the corpus in {prepared.build_seconds:.1f} s: {what}; cached in {prepared.folder}"


def dropped_letters_warning(prepared: PreparedCorpus) -> str | None:
    """A warning when normalization dropped more than ``WARN_LETTER_LOSS`` of the text's letters, else None."""
    if prepared.dropped_share <= WARN_LETTER_LOSS:
        return None
    return (
        f"--normalize {prepared.settings.normalize} keeps only the letters a-z: it dropped "
        f"{prepared.dropped_share:.1%} of this text's letters ({prepared.dropped_letters:,} of "
        f"{prepared.letters:,}); use --normalize none to keep every character"
    )
