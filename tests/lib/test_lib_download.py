"""deeprnn.data.download at the library level: a real HTTP server on 127.0.0.1, a cache in a temporary folder."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from corpora import CorpusFile

from deeprnn.config import D2L_SHA1
from deeprnn.data.download import (
    CACHE_ENV,
    DownloadError,
    TransientDownloadError,
    cache_dir,
    fetch_corpus,
    read_text_chunks,
    redact_url,
)
from deeprnn.data.file_io import sha1_of

TEXT = b"The Time Machine, by H. G. Wells\n\nThe Time Traveller (for so it will be convenient)\n"
SHA1 = hashlib.sha1(TEXT).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_writes_cache_and_sha1_record(http_server, tmp_path: Path) -> None:
    url = http_server.serve("/data/timemachine.txt", TEXT)
    cache = tmp_path / "cache"
    got = fetch_corpus(url, SHA1, cache=cache)
    assert got.path.parent == cache
    assert got.path.read_bytes() == TEXT
    assert (got.sha1, got.num_bytes, got.source) == (SHA1, len(TEXT), url)
    assert _files(cache) == [f"{SHA1}.sha1", f"{SHA1}.txt"]  # no temporary files left
    assert (cache / f"{SHA1}.sha1").read_text().strip() == SHA1
    assert http_server.hits == ["/data/timemachine.txt"]


def test_second_call_uses_the_cache_without_network(http_server, tmp_path: Path) -> None:
    url = http_server.serve("/t.txt", TEXT)
    cache = tmp_path / "cache"
    first = fetch_corpus(url, SHA1, cache=cache)
    http_server.stop()
    again = fetch_corpus(url, SHA1, cache=cache)
    assert again.path == first.path and again.sha1 == SHA1
    assert http_server.hits == ["/t.txt"]
    # Without an expected hash, the recorded hash vouches for the cached copy.
    unpinned = tmp_path / "unpinned"
    with pytest.raises(TransientDownloadError):
        fetch_corpus(url, None, cache=unpinned)  # the server is down: nothing cached yet


def test_unpinned_download_is_cached_by_recorded_hash(http_server, tmp_path: Path) -> None:
    url = http_server.serve("/t.txt", TEXT)
    cache = tmp_path / "cache"
    first = fetch_corpus(url, None, cache=cache)
    assert first.sha1 == SHA1
    assert first.path.name != "t.txt" and first.path.name.endswith(".txt")
    assert first.path.with_suffix(".sha1").read_text().strip() == SHA1
    http_server.stop()
    assert fetch_corpus(url, None, cache=cache).path == first.path


def test_cache_from_the_environment(http_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv(CACHE_ENV, str(env_cache))
    assert cache_dir() == env_cache
    got = fetch_corpus(http_server.serve("/t.txt", TEXT), SHA1)
    assert got.path == env_cache / f"{SHA1}.txt"


@pytest.mark.parametrize("pinned", [True, False])
def test_corrupted_cache_is_detected_and_fetched_again(
    http_server, tmp_path: Path, caplog: pytest.LogCaptureFixture, pinned: bool
) -> None:
    url = http_server.serve("/t.txt", TEXT)
    cache = tmp_path / "cache"
    expected = SHA1 if pinned else None
    first = fetch_corpus(url, expected, cache=cache)
    first.path.write_bytes(TEXT[:-5] + b"XXXX\n")
    with caplog.at_level(logging.WARNING, logger="deeprnn.data.download"):
        again = fetch_corpus(url, expected, cache=cache)
    assert again.path.read_bytes() == TEXT
    assert len(http_server.hits) == 2
    assert any("fetching it again" in r.getMessage() for r in caplog.records)


def test_wrong_sha1_names_both_hashes_and_caches_nothing(http_server, tmp_path: Path) -> None:
    url = http_server.serve("/t.txt", TEXT)
    cache = tmp_path / "cache"
    wrong = "0" * 40
    with pytest.raises(DownloadError) as info:
        fetch_corpus(url, wrong, cache=cache)
    msg = str(info.value)
    assert wrong in msg and SHA1 in msg and "sha1 mismatch" in msg
    assert not isinstance(info.value, TransientDownloadError)
    assert _files(cache) == []


def test_404_fails_at_once_naming_the_url(http_server, tmp_path: Path) -> None:
    url = http_server.url("/missing.txt")
    with pytest.raises(DownloadError) as info:
        fetch_corpus(url, None, cache=tmp_path / "cache")
    assert not isinstance(info.value, TransientDownloadError)
    assert url in str(info.value) and "404" in str(info.value)
    assert http_server.hits == ["/missing.txt"]  # 4xx is never retried
    assert _files(tmp_path / "cache") == []


def test_500_is_one_get_without_retries(http_server, tmp_path: Path) -> None:
    # No HTTP-level retries hide behind a call: one attempt is one GET (the download-corpus task retries).
    url = http_server.serve("/flaky.txt", b"oops", status=500)
    with pytest.raises(TransientDownloadError, match="HTTP 500") as info:
        fetch_corpus(url, None, cache=tmp_path / "cache")
    assert url in str(info.value) and "attempts" not in str(info.value)
    assert http_server.hits == ["/flaky.txt"]
    assert _files(tmp_path / "cache") == []


def test_connection_refused_is_transient(closed_port_url, tmp_path: Path) -> None:
    url = closed_port_url()
    with pytest.raises(TransientDownloadError, match="could not reach") as info:
        fetch_corpus(url, None, cache=tmp_path / "cache")
    assert url in str(info.value) and "attempts" not in str(info.value)  # one attempt: the caller retries
    assert _files(tmp_path / "cache") == []


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", "empty"),
        (b" \n\t\n", "empty"),
        (b"text\x00\x01\x02 binary", "binary"),
        ("caf\u00e9".encode("latin-1") + b" au lait\n", "not UTF-8"),
    ],
)
def test_non_text_is_refused_and_not_cached(http_server, tmp_path: Path, body: bytes, words: str) -> None:
    url = http_server.serve("/t.txt", body)
    with pytest.raises(DownloadError, match=words):
        fetch_corpus(url, None, cache=tmp_path / "cache")
    assert _files(tmp_path / "cache") == []


def test_utf8_beyond_ascii_is_accepted(http_server, tmp_path: Path) -> None:
    body = "caf\u00e9 \u2014 na\u00efve\n".encode("utf-8")
    got = fetch_corpus(http_server.serve("/t.txt", body), None, cache=tmp_path / "cache")
    assert got.path.read_bytes() == body and got.kind == "text"


def test_the_books_file_through_the_real_download_path(http_server, corpus_file: CorpusFile, tmp_path: Path) -> None:
    url = http_server.serve("/timemachine.txt", corpus_file.path.read_bytes())
    got = fetch_corpus(url, corpus_file.sha1, cache=tmp_path / "cache")  # D2L_SHA1 on the book
    assert got.sha1 == corpus_file.sha1 and got.num_bytes == corpus_file.num_bytes  # 178,979 bytes on the book
    assert sha1_of(got.path) == corpus_file.sha1
    assert (corpus_file.sha1 == D2L_SHA1) == corpus_file.is_book


def test_local_path_and_file_url(tmp_path: Path) -> None:
    path = tmp_path / "my corpus.txt"
    path.write_bytes(TEXT)
    for source in (str(path), path.as_uri()):
        got = fetch_corpus(source, SHA1, cache=tmp_path / "cache")
        assert got.path == path and got.sha1 == SHA1 and got.num_bytes == len(TEXT)
    assert fetch_corpus(str(path), None, cache=tmp_path / "cache").sha1 == SHA1
    assert not (tmp_path / "cache").exists()  # local files are read in place
    with pytest.raises(DownloadError, match="sha1 mismatch"):
        fetch_corpus(str(path), "1" * 40)
    with pytest.raises(DownloadError, match="not found"):
        fetch_corpus(str(tmp_path / "absent.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DownloadError, match="empty"):
        fetch_corpus(empty.as_uri())


@pytest.mark.parametrize("url", ["ftp://example.com/t.txt", "gopher://example.com/t", "s3://bucket/key"])
def test_unsupported_scheme(url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        fetch_corpus(url, cache=tmp_path / "cache")


def test_credentials_never_shown(http_server, tmp_path: Path) -> None:
    url = http_server.url("/private.txt").replace("http://", "http://alice:s3cret@")
    with pytest.raises(DownloadError) as info:
        fetch_corpus(url, None, cache=tmp_path / "cache")
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value)
    http_server.serve("/private.txt", TEXT)
    got = fetch_corpus(url, None, cache=tmp_path / "cache")
    assert "s3cret" not in got.source and got.source == http_server.url("/private.txt")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("https://user:pa55@example.com/a/b.txt?x=1#f", "https://example.com/a/b.txt?x=1#f"),
        ("https://user@example.com:8443/a", "https://example.com:8443/a"),
        ("http://:pw@example.com/a", "http://example.com/a"),
        ("https://example.com/a?token=1", "https://example.com/a?token=1"),
        ("/local/path.txt", "/local/path.txt"),
        ("http://u:p@[::1]:8080/t.txt", "http://[::1]:8080/t.txt"),  # IPv6 keeps its brackets
        ("http://u:p@Example.COM:80x/t", "http://Example.COM:80x/t"),  # a bad port is shown, not raised on
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_cache_name_never_comes_from_the_url(http_server, tmp_path: Path) -> None:
    http_server.default = (200, TEXT)
    cache = tmp_path / "deep" / "cache"
    for url in (
        http_server.url("/a/b/../../evil"),
        http_server.url("/..%2F..%2Fevil.txt"),
        http_server.url("/x/evil.txt?name=../../evil"),
    ):
        for expected in (None, SHA1):
            got = fetch_corpus(url, expected, cache=cache)
            assert got.path.resolve().parent == cache.resolve()
            assert "evil" not in got.path.name
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != cache]
    assert outside == []
    assert all("evil" not in name for name in os.listdir(cache))


# ----- streaming, gzip, broken transfers -------------------------------------------------------------

# Several read chunks of text with multi-byte characters everywhere, so chunk boundaries fall inside them.
BIG_TEXT = "".join(f"line {i}: Über die Brücke, 中文, \U0001f600 {i * 7919}\n" for i in range(40_000)).encode()


def test_a_streamed_download_hashes_what_it_wrote(http_server, tmp_path: Path) -> None:
    assert len(BIG_TEXT) > 20 * (1 << 16)
    url = http_server.serve("/big.txt", BIG_TEXT)
    got = fetch_corpus(url, None, cache=tmp_path / "cache")
    assert (got.kind, got.num_bytes, got.sha1) == ("text", len(BIG_TEXT), hashlib.sha1(BIG_TEXT).hexdigest())
    assert got.path.read_bytes() == BIG_TEXT and sha1_of(got.path) == got.sha1
    assert "".join(read_text_chunks(got)) == BIG_TEXT.decode()


def test_a_download_never_holds_the_whole_file_in_memory(http_server, tmp_path: Path) -> None:
    body = BIG_TEXT * 3  # about 14 MB
    url = http_server.serve("/big.txt", body)
    tracemalloc.start()
    try:
        got = fetch_corpus(url, None, cache=tmp_path / "cache")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.num_bytes == len(body)
    assert peak < len(body) / 8, f"peak {peak} bytes for a {len(body)}-byte download"


@pytest.mark.parametrize("path", ["/corpus.txt.gz", "/corpus.txt"])  # found by its magic bytes, not its name
def test_a_gzip_download_keeps_the_served_bytes_and_reads_as_text(http_server, tmp_path: Path, path: str) -> None:
    served = gzip.compress(BIG_TEXT)
    url = http_server.serve(path, served)
    cache = tmp_path / "cache"
    sha1 = hashlib.sha1(served).hexdigest()
    got = fetch_corpus(url, sha1, cache=cache)
    assert (got.kind, got.sha1, got.num_bytes) == ("gzip", sha1, len(served))  # the file as served
    assert got.path == cache / f"{sha1}.gz" and got.path.read_bytes() == served
    assert _files(cache) == [f"{sha1}.gz", f"{sha1}.sha1"]
    assert "".join(read_text_chunks(got, chunk_bytes=1000)) == BIG_TEXT.decode()
    http_server.stop()
    assert fetch_corpus(url, sha1, cache=cache) == got  # from the cache, without network


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda gz: gz[: len(gz) // 2], "truncated"),
        (lambda gz: gz[:-3], "truncated"),  # cut inside the trailer (CRC and length)
        (lambda gz: gz[:20] + bytes(b ^ 0x55 for b in gz[20:60]) + gz[60:], "Error -3"),
        (lambda gz: gz[:-8] + b"\x00\x00\x00\x00" + gz[-4:], "incorrect data check"),  # the CRC
    ],
)
def test_a_corrupt_gzip_download_is_one_clear_error_and_caches_nothing(
    http_server, tmp_path: Path, damage, reason: str
) -> None:
    url = http_server.serve("/corpus.txt.gz", damage(gzip.compress(BIG_TEXT)))
    with pytest.raises(DownloadError, match=f"{re.escape(url)} is not a valid gzip file: .*{reason}") as info:
        fetch_corpus(url, None, cache=tmp_path / "cache")
    assert not isinstance(info.value, TransientDownloadError)
    assert _files(tmp_path / "cache") == []


@pytest.mark.parametrize(
    "text, words",
    [
        (b"", "is empty"),
        (b"a\x00b", "looks binary"),
        (b"caf\xe9\n", r"not UTF-8 text \(invalid byte at offset 3 of the decompressed text\)"),
    ],
)
def test_a_gzip_of_something_that_is_not_text_is_refused(http_server, tmp_path: Path, text: bytes, words: str) -> None:
    url = http_server.serve("/c.gz", gzip.compress(text))
    with pytest.raises(DownloadError, match=words):
        fetch_corpus(url, None, cache=tmp_path / "cache")
    assert _files(tmp_path / "cache") == []


def test_a_wrong_hash_is_reported_before_what_is_wrong_with_the_text(http_server, tmp_path: Path) -> None:
    # Without a hash the first bad byte stops the download; with one, the wrong file is the first fault.
    url = http_server.serve("/t.txt", b"text\x00binary")
    with pytest.raises(DownloadError, match="looks binary"):
        fetch_corpus(url, None, cache=tmp_path / "cache")
    with pytest.raises(DownloadError, match="sha1 mismatch"):
        fetch_corpus(url, "2" * 40, cache=tmp_path / "cache")
    assert _files(tmp_path / "cache") == []


@pytest.fixture()
def short_body_url() -> Iterator[str]:
    """A server that promises 100,000 bytes, sends 1,000 and closes the connection."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"a" * 1000)
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/t.txt"
    server.shutdown()
    server.server_close()


def test_a_transfer_that_breaks_off_is_transient_and_leaves_no_partial_file(
    short_body_url: str, tmp_path: Path
) -> None:
    with pytest.raises(TransientDownloadError, match=f"the download of {re.escape(short_body_url)} broke off"):
        fetch_corpus(short_body_url, None, cache=tmp_path / "cache")
    assert _files(tmp_path / "cache") == []


def test_a_cache_that_cannot_be_written_is_one_clear_error(http_server, tmp_path: Path) -> None:
    url = http_server.serve("/t.txt", TEXT)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_bytes(b"a file where the cache folder should be")
    with pytest.raises(DownloadError, match=f"cannot write the corpus into the cache {re.escape(str(not_a_folder))}: "):
        fetch_corpus(url, None, cache=not_a_folder)
    assert http_server.hits == []  # found before any download
