"""The token cache trusts nothing unverified: damaged files and entries of the wrong kind are rebuilt, the
folders of dead builds removed, and a full disk is one message with nothing half-written kept."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from small_disk import small_disk

from deeprnn.config import DataConfig
from deeprnn.data import prepare as prep
from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
from deeprnn.data.download import DownloadError, fetch_corpus
from deeprnn.data.prepare import CacheWriteError
from deeprnn.data.vocab import Vocab

TEXT = "The Time Traveller (for so it will be convenient to speak of him)\nwas expounding a recondite matter.\n"


@pytest.fixture()
def corpus(tmp_path: Path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 50, encoding="utf-8")
    return fetch_corpus(str(path))


def _books_entry(prepared: prep.PreparedCorpus) -> None:
    """The entry holds the book's vocabulary and ids of ``TEXT * 50``."""
    tokens = flatten(tokenize(preprocess_lines(TEXT * 50), "char"))
    book = Vocab(tokens)
    assert prepared.vocab().idx_to_token == book.idx_to_token
    assert np.array_equal(prepared.ids(), np.array(book.encode(tokens)))


def test_a_flipped_bit_in_vocab_json_is_found_and_rebuilt(corpus, tmp_path: Path, caplog) -> None:
    good = prep.prepare(corpus, DataConfig(), tmp_path)
    raw = bytearray((good.folder / "vocab.json").read_bytes())
    at = raw.index(b'"e"') + 1
    raw[at] ^= 0x02  # "e" -> "g": a vocabulary without the letter e, ids unchanged
    (good.folder / "vocab.json").write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="deeprnn.data.token_cache"):
        again = prep.prepare(corpus, DataConfig(), tmp_path)
    assert not again.cache_hit and "vocab.json does not match the SHA-1 in meta.json" in caplog.text
    assert len(caplog.records) == 1 and "preparing it again" in caplog.text
    _books_entry(again)
    assert prep.prepare(corpus, DataConfig(), tmp_path).cache_hit


def test_a_flipped_bit_anywhere_in_meta_json_is_found_and_rebuilt(corpus, tmp_path: Path) -> None:
    first = prep.prepare(corpus, DataConfig(), tmp_path)
    meta_path = first.folder / "meta.json"
    size = len(meta_path.read_bytes())
    for at in range(0, size, 23):  # a byte of every key and value, braces and indentation among them
        raw = bytearray(meta_path.read_bytes())
        raw[at] ^= 0x01
        meta_path.write_bytes(bytes(raw))
        again = prep.prepare(corpus, DataConfig(), tmp_path)
        assert not again.cache_hit, (at, bytes(raw[max(0, at - 10) : at + 10]))
        _books_entry(again)


@pytest.mark.parametrize("kind", ["a file", "a broken link", "a link to a folder", "an empty folder"])
def test_an_entry_of_the_wrong_kind_is_rebuilt(corpus, tmp_path: Path, kind: str, caplog) -> None:
    folder = prep.prepare(corpus, DataConfig(), tmp_path).folder
    prep.token_cache.remove(folder)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the cache's")
    if kind == "a file":
        folder.write_text("not an entry")
    elif kind == "a broken link":
        folder.symlink_to(tmp_path / "nowhere")
    elif kind == "a link to a folder":
        folder.symlink_to(elsewhere)
    else:
        folder.mkdir()
    with caplog.at_level("WARNING", logger="deeprnn.data.token_cache"):
        again = prep.prepare(corpus, DataConfig(), tmp_path)
    assert not again.cache_hit and folder.is_dir() and not folder.is_symlink()
    assert "is damaged" in caplog.text
    _books_entry(again)
    assert (elsewhere / "keep.txt").read_text() == "not the cache's"  # a link's target is never touched


def _build_folder(root: Path, name: str, builder: dict | None = None, age: float = 0) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "ids.bin").write_bytes(b"\0" * 1000)
    if builder is not None:
        (path / "builder.json").write_text(json.dumps(builder))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_build_folders_of_dead_builds_are_removed_and_live_ones_kept(corpus, tmp_path: Path, caplog) -> None:
    root = tmp_path / "tokens"
    ours = prep.TokenSettings.of(DataConfig()).key(corpus.sha1)
    other, busy = "1" * 32, "2" * 32
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that has ended: its pid names nobody now
    here = socket.gethostname()
    dead = {
        "ours": _build_folder(root, f".build-{ours}-a1"),  # older than us, the lock's holder
        "dead pid": _build_folder(root, f".build-{other}-b2", {"pid": gone.pid, "host": here}),
        "free lock": _build_folder(root, f".build-{other}-c3", {"pid": 1, "host": "another-host"}),
        "old, no record": _build_folder(root, ".build-x9y8z7", age=2 * 24 * 3600),
    }
    live = {
        "locked, alive": _build_folder(root, f".build-{busy}-d4", {"pid": os.getpid(), "host": here}),
        "locked, other host": _build_folder(root, f".build-{busy}-e5", {"pid": 1, "host": "another-host"}),
        "recent, no record": _build_folder(root, ".build-q1w2e3"),
    }
    with FileLock(str(root / f"{busy}.lock")), caplog.at_level("INFO", logger="deeprnn.data.token_cache"):
        prepared = prep.prepare(corpus, DataConfig(), tmp_path)
    assert [name for name, path in dead.items() if path.exists()] == []
    assert [name for name, path in live.items() if not path.exists()] == []
    assert caplog.text.count("left by a build that stopped") == len(dead)
    _books_entry(prepared)


def _cjk_text() -> str:
    """A multi-byte text of 300 Chinese characters (three UTF-8 bytes each): more than uint8 ids hold."""
    chars = [chr(0x4E00 + 7 * i) for i in range(300)]
    return "".join("".join(chars[(i * 13 + j) % 300] for j in range(25)) + "。\n" for i in range(40_000))


@pytest.mark.parametrize(
    "kind, data, dtype",
    [
        ("book", {}, "uint8"),  # ASCII, the book's rule: the ids and the spilled text
        ("book", {"normalize": "none"}, "uint8"),
        ("book-gz", {}, "uint8"),  # the sample's tokens a byte scaled by the gzip trailer's text size
        ("book", {"token": "word", "normalize": "none"}, "uint16"),
        ("cjk", {"normalize": "none"}, "uint16"),  # 3 MB of multi-byte text, 1 MB of tokens
        ("many-words", {"token": "word", "normalize": "none"}, "uint32"),  # 70,000 words
    ],
)
def test_the_space_estimate_is_within_a_fifth_of_what_the_build_takes(
    book_path: Path, tmp_path: Path, kind: str, data: dict[str, str], dtype: str
) -> None:
    source = tmp_path / f"{kind}.txt"
    if kind.startswith("book"):
        source.write_bytes(book_path.read_bytes() * 12)  # about 2 MB: the estimate reads the first MB only
        if kind == "book-gz":
            source.write_bytes(gzip.compress(source.read_bytes(), mtime=0))
    elif kind == "cjk":
        source.write_text(_cjk_text(), encoding="utf-8")
    else:
        source.write_text(" ".join(f"w{i}" for i in range(70_000)) + "\n", encoding="utf-8")
    corpus = fetch_corpus(str(source))
    config = DataConfig(**data)
    estimate = prep.estimate_space(corpus, prep.TokenSettings.of(config))
    prepared = prep.prepare(corpus, config, tmp_path / "cache")
    kept = sum((prepared.folder / name).stat().st_size for name in ("ids.bin", "vocab.json", "meta.json"))
    assert (
        prepared.dtype == dtype
        and (prepared.folder / "ids.bin").stat().st_size == prepared.num_tokens * np.dtype(dtype).itemsize
    )
    assert estimate.entry == pytest.approx(kept, rel=0.2)
    # While building with the book's rule the normalized text, one byte a token, is on disk beside the ids.
    spill = prepared.num_tokens if config.normalize == "d2l" else 0
    assert estimate.peak == pytest.approx(kept + spill, rel=0.2)


def test_a_full_disk_is_one_message_and_keeps_nothing(tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    source.write_text(TEXT * 40_000, encoding="utf-8")  # 4 MB: the spill and the ids need about twice that
    corpus = fetch_corpus(str(source))
    with small_disk(tmp_path / "disk", "2m") as disk:
        with pytest.raises(CacheWriteError) as caught:
            prep.prepare(corpus, DataConfig(), disk)
        message = str(caught.value)
        assert f"cannot write the token cache in {disk / 'tokens'}: No space left on device" in message
        tokens = 3_840_000  # the book's rule keeps 96 of TEXT's 99 characters
        assert f"writes about {2 * tokens / 1e6:.1f} MB and keeps {tokens / 1e6:.1f} MB" in message  # 7.7, 3.8
        assert "free some space there" in message.lower()
        assert "DEEPRNN_CACHE_DIR" in message
        assert sorted(p.name for p in (disk / "tokens").iterdir() if not p.name.endswith(".lock")) == []
    prepared = prep.prepare(corpus, DataConfig(), tmp_path / "roomy")  # the same corpus where there is room
    assert prepared.num_tokens > 3_000_000


def test_a_download_onto_a_full_disk_is_one_message_and_keeps_nothing(tmp_path: Path, http_server) -> None:
    url = http_server.serve("/big.txt", TEXT.encode() * 40_000)
    with small_disk(tmp_path / "disk", "2m") as disk:
        with pytest.raises(DownloadError) as caught:
            fetch_corpus(url, cache=disk)
        message = str(caught.value)
        assert f"cannot write the corpus into the cache {disk}: No space left on device" in message
        assert "4.0 MB" in message and "DEEPRNN_CACHE_DIR" in message
        assert list(disk.iterdir()) == []  # no partial download left to trust


def test_an_entry_of_the_previous_format_is_rebuilt_in_place(corpus, tmp_path: Path, caplog) -> None:
    first = prep.prepare(corpus, DataConfig(), tmp_path)
    meta = json.loads((first.folder / "meta.json").read_text())
    old = {k: v for k, v in meta.items() if k not in ("vocab_sha1", "meta_sha1")} | {"format": "deeprnn-tokens/1"}
    (first.folder / "meta.json").write_text(json.dumps(old))  # as the version before wrote it: ids.bin hashed only
    with caplog.at_level("WARNING", logger="deeprnn.data.token_cache"):
        again = prep.prepare(corpus, DataConfig(), tmp_path)
    assert not again.cache_hit and again.folder == first.folder and "an older version wrote it" in caplog.text
    _books_entry(again)
