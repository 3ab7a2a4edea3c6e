"""Stage 3: tokenize a corpus once and keep its token ids on disk (the prepared token cache).

Like nanoGPT's ``prepare.py`` (a ``train.bin`` memory map beside a ``meta.pkl``) or torch-rnn's
``preprocess.py`` (an HDF5 array beside a JSON vocabulary), each prepared corpus is a folder::

    <cache>/tokens/<key>/
        ids.bin      every token id of the corpus, in order, as the smallest unsigned type that holds the
                     vocabulary (uint8 up to 256 tokens, then uint16, then uint32): memory-mappable
        vocab.json   the vocabulary (``Vocab.to_dict``)
        meta.json    what it was built from, the SHA-1 of the other two files and of itself, checked on every use

``key`` is content-addressed: a hash of the corpus SHA-1 and every setting the ids depend on (token unit,
normalization, ``min_freq``, reserved tokens). Any other setting (splits, model, training) reuses the entry.
An entry that fails its checks is rebuilt (``deeprnn.data.token_cache``). Entries are built in a temporary folder
and renamed into place, under a file lock, so concurrent runs (sweep trials) build each one once; the
folders of builds that died are removed by the next call. A full disk is one ``CacheWriteError`` naming the
folder and the space needed, with nothing half-written left: refused before tokenizing when the free space is
less than ``estimate_space`` says the build takes (from the text's first MB), or when the disk fills anyway.

Building streams the corpus twice (count, then encode) in chunks, vectorized with numpy over code points,
so memory stays bounded by the chunk size whatever the size of the text and the length of its lines.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from deeprnn.config import DataConfig
from deeprnn.data import token_cache
from deeprnn.data.download import CACHE_ENV, CorpusFile, cache_dir, read_text_chunks
from deeprnn.data.file_io import megabytes
from deeprnn.data.normalize import PrepareError as PrepareError  # its home is below; callers import it from here
from deeprnn.data.token_cache import SpaceEstimate
from deeprnn.data.token_counts import CHUNK_BYTES, CharCounter, WordCounter
from deeprnn.data.vocab import Vocab

KEY_FORMAT = "deeprnn-tokens/1"  # in every key: a new value moves every entry (entries of another format
# under the same key are rebuilt in place instead, see token_cache.FORMAT)
SAMPLE_BYTES = 1 << 20  # text tokenized to estimate the cache entry's size
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
MAX_VOCAB = 250_000  # beyond this the one-hot input and output layer of a model no longer fit in memory
WARN_LETTER_LOSS = 0.01  # warn when normalization drops more than this share of the text's letters
# vocab.json holds each token twice (``idx_to_token`` and ``token_freqs``) with its count and JSON punctuation.
VOCAB_BYTES_PER_TOKEN = 40
VOCAB_BYTES_FIXED = 1000  # meta.json, builder.json and vocab.json's own keys


class CacheWriteError(PrepareError):
    """The token cache cannot be written (a full disk, a read-only or missing folder); the message says where."""


@dataclasses.dataclass(frozen=True)
class TokenSettings:
    """Everything besides the corpus bytes that the token ids depend on."""

    token: str
    normalize: str
    min_freq: int
    reserved_tokens: list[str]

    @classmethod
    def of(cls, data: DataConfig) -> "TokenSettings":
        """The settings of a data configuration."""
        return cls(data.token, data.normalize, data.min_freq, list(data.reserved_tokens))

    def key(self, corpus_sha1: str) -> str:
        """The cache key of these settings on the corpus with ``corpus_sha1``."""
        text = json.dumps([KEY_FORMAT, corpus_sha1, self.token, self.normalize, self.min_freq, self.reserved_tokens])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def describe(self) -> dict[str, Any]:
        """JSON-ready form, as ``meta.json`` stores it."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
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
    def dropped_share(self) -> float:
        """The share of the text's letters that normalization removed."""
        return self.dropped_letters / self.letters if self.letters else 0.0

    def ids(self) -> np.ndarray:
        """The token ids as a read-only-on-disk memory map (copy-on-write in memory; nothing is read yet)."""
        return np.memmap(self.folder / "ids.bin", dtype=self.dtype, mode="c", shape=(self.num_tokens,))

    def vocab(self) -> Vocab:
        """The vocabulary the ids index."""
        return Vocab.load(self.folder / "vocab.json")


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every index of a vocabulary of ``vocab_size`` (at least 1;
    ``_check_vocab`` has refused one beyond ``MAX_VOCAB``, so it is uint8, uint16 or uint32)."""
    return np.min_scalar_type(vocab_size - 1)


def prepare(
    corpus: CorpusFile, data: DataConfig, cache: Path | None = None, *, chunk_bytes: int = CHUNK_BYTES
) -> PreparedCorpus:
    """The prepared token ids of ``corpus`` with ``data``'s tokenization settings: from the cache when a valid
    entry exists (nothing is tokenized), else tokenized now (reading ``chunk_bytes`` at a time) and cached.

    Raises ``PrepareError`` when the settings leave nothing to train on or a word vocabulary too large to hold,
    and its ``CacheWriteError`` when the cache cannot be written (a full disk).
    """
    from filelock import FileLock

    settings = TokenSettings.of(data)
    root = (cache if cache is not None else cache_dir()) / "tokens"
    folder = root / settings.key(corpus.sha1)
    try:
        root.mkdir(parents=True, exist_ok=True)
        held = FileLock(str(folder) + ".lock", timeout=3600).acquire()  # one builder per entry; the others read it
    except OSError as exc:
        raise _cache_write_error(root, exc, None) from None
    with held:  # released on leaving
        token_cache.remove_dead_builds(root, folder.name)
        meta = token_cache.read_entry(folder)
        if meta is not None:
            return _from_meta(folder, meta, cache_hit=True)
        return _build_entry(corpus, settings, folder, chunk_bytes)


def _from_meta(folder: Path, meta: dict[str, Any], cache_hit: bool) -> PreparedCorpus:
    """The prepared corpus that a verified ``meta.json`` (its own SHA-1 checked: as written) describes."""
    stored = {f.name for f in dataclasses.fields(PreparedCorpus)} - {"folder", "settings", "cache_hit"}
    settings = TokenSettings(**meta["settings"])
    return PreparedCorpus(folder, settings=settings, cache_hit=cache_hit, **{k: meta[k] for k in stored})


def _build_entry(corpus: CorpusFile, settings: TokenSettings, folder: Path, chunk_bytes: int) -> PreparedCorpus:
    """Tokenize ``corpus`` into a build folder beside ``folder``, then rename it into place."""
    started = time.perf_counter()
    needed = estimate_space(corpus, settings)
    try:
        free = shutil.disk_usage(folder.parent).free  # a build the disk has no room for is refused before it starts
        if free < needed.peak:
            raise _cache_write_error(folder.parent, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed, free)
        tmp = token_cache.new_build_folder(folder.parent, folder.name)
    except OSError as exc:
        raise _cache_write_error(folder.parent, exc, needed) from None
    try:
        meta = _tokenize_into(tmp, corpus, settings, chunk_bytes)
        meta["build_seconds"] = round(time.perf_counter() - started, 3)
        token_cache.publish(tmp, folder, meta)
    except BaseException as exc:
        token_cache.remove(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise _cache_write_error(folder.parent, exc, needed) from None
        raise
    return _from_meta(folder, meta, cache_hit=False)


def _tokenize_into(tmp: Path, corpus: CorpusFile, settings: TokenSettings, chunk_bytes: int) -> dict[str, Any]:
    """Count, build the vocabulary, write ``ids.bin`` and ``vocab.json`` into ``tmp``; returns the meta data."""
    text = functools.partial(read_text_chunks, corpus, chunk_bytes)
    counter = _counted(settings, text(), tmp / "normalized.tmp")
    vocab = Vocab(counter.token_freqs(), settings.min_freq, settings.reserved_tokens)
    _check_vocab(corpus, settings, counter, vocab)
    # Only the kept tokens' counts travel on (vocab.json, checkpoints): a word corpus may count millions.
    vocab.token_freqs = [(t, f) for t, f in vocab.token_freqs if f >= settings.min_freq]
    dtype = id_dtype(len(vocab))
    digest = hashlib.sha1()
    with open(tmp / "ids.bin", "wb") as fh:
        for ids in counter.encoded(vocab, dtype, text):
            digest.update(ids.data)
            fh.write(ids.data)
    vocab.save(tmp / "vocab.json")
    letters, dropped = counter.letter_loss()
    return {
        "corpus_sha1": corpus.sha1,
        "source": corpus.source,
        "settings": settings.describe(),
        "num_tokens": counter.num_tokens,
        "vocab_size": len(vocab),
        "dtype": dtype.name,
        "ids_sha1": digest.hexdigest(),
        "letters": letters,
        "dropped_letters": dropped,
    }


def estimate_space(corpus: CorpusFile, settings: TokenSettings) -> SpaceEstimate:
    """About how much disk preparing ``corpus`` takes, from its first ``SAMPLE_BYTES`` of text tokenized with
    ``settings`` (tokens a byte of text, the vocabulary seen) scaled to the whole text, without writing."""
    sample = ""
    for piece in read_text_chunks(corpus, SAMPLE_BYTES):  # stopped early: only the sample is read
        sample += piece
        if len(sample) >= SAMPLE_BYTES:
            break
    counter = _counted(settings, [sample])  # a text refused here is refused at once by the build
    sampled = max(1, len(sample.encode("utf-8")))
    text_bytes = corpus.num_bytes
    if corpus.kind == "gzip":  # the trailer's size of the decompressed data (modulo 2**32)
        with open(corpus.path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            text_bytes = int.from_bytes(fh.read(4), "little")
    num_tokens = round(counter.num_tokens * max(sampled, text_bytes) / sampled)
    vocab_size = len(counter.token_freqs()) + 1 + len(settings.reserved_tokens)
    entry = num_tokens * id_dtype(vocab_size).itemsize + vocab_size * VOCAB_BYTES_PER_TOKEN + VOCAB_BYTES_FIXED
    spill = num_tokens if settings.token == "char" and settings.normalize == "d2l" else 0  # the book's rule's text
    return SpaceEstimate(entry, entry + spill)


def _counted(settings: TokenSettings, text: Iterable[str], spill: Path | None = None) -> CharCounter | WordCounter:
    """The tokens of ``text`` counted with ``settings`` (``spill``: where a char counter keeps the normalized
    text); a text the counters refuse (too many words, a word too long) raises a ``PrepareError``."""
    counter = CharCounter(settings.normalize, spill) if settings.token == "char" else WordCounter(settings.normalize)
    counter.count(text)
    return counter


def _cache_write_error(
    where: Path, exc: OSError, needed: SpaceEstimate | None, free: int | None = None
) -> CacheWriteError:
    """The one message for a token cache that cannot be written: where, about how much, what to do."""
    size = ""
    if needed is not None:
        size = f" (preparing this corpus writes about {megabytes(needed.peak)}"
        size += f" and keeps {megabytes(needed.entry)}" if needed.entry != needed.peak else ""
        size += f"; {megabytes(free)} free there)" if free is not None else ")"
    what = "Free some space there" if exc.errno in _DISK_FULL else "Make it writable"
    return CacheWriteError(
        f"cannot write the token cache in {where}: {exc.strerror or exc}{size}; nothing was kept. "
        f"{what}, or set {CACHE_ENV} to a folder on a disk with room"
    )


def _check_vocab(corpus: CorpusFile, settings: TokenSettings, counter: CharCounter | WordCounter, vocab: Vocab) -> None:
    """Refuse settings that leave nothing to train on, or a vocabulary too large to hold in memory."""
    if counter.num_tokens == 0:
        rule = "the book's rule keeps only the letters a-z" if settings.normalize == "d2l" else "it has no tokens"
        raise PrepareError(
            f"{corpus.source} normalizes to nothing with --normalize {settings.normalize} ({rule}, and this text "
            "has none): use --normalize none to keep every character"
        )
    if len(vocab) > MAX_VOCAB:
        counts = np.fromiter(counter.token_freqs().values(), dtype=np.int64)
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
    names = ("cache_hit", "corpus_sha1", "vocab_size", "dtype", "num_tokens")
    fields = {name: getattr(prepared, name) for name in names}
    return {"folder": str(prepared.folder), **fields, "splits": split_sizes(prepared, data)}


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
