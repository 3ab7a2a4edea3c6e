"""Stage 1: fetch the corpus into a local, hash-checked cache.

Sources are ``http(s)://`` URLs (fetched with ``requests``), ``file://`` URLs and local paths: a text file, a
gzip-compressed one (``.gz``, recognised by its first bytes) or a folder of text files. Downloads stream to a
temporary file in the cache folder with the SHA-1 computed and the text checked on the way (never the whole
file in memory), and are renamed into place only once verified (the SHA-1 when one is expected, the text
always), so a failed or tampered download never leaves a file behind. A cached file is reused only while its
hash still matches, so a corrupted cache is fetched again and a valid one needs no network. Local sources are
read in place, in the same one streamed pass of checks.

The SHA-1 of a download is that of the body as ``requests`` hands it over, once any HTTP
``Content-Encoding`` is undone: a ``.gz`` file served as a file keeps its compressed bytes and SHA-1.

``fetch_corpus`` makes one attempt: a network fault raises ``TransientDownloadError`` (worth trying again
later), anything else ``DownloadError``. In the pipeline the ``download-corpus`` task is the one retry layer
(Prefect task retries of transient faults only); a caller of its own retries, or not, as it sees fit. Read
the text with ``read_text_chunks``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import deque
from pathlib import Path
from urllib.parse import unquote, urlsplit

import requests

from deeprnn.data import corpus_stream
from deeprnn.data.corpus_stream import CorpusFile, CorpusKind, DownloadError, TransientDownloadError, read_text_chunks
from deeprnn.data.file_io import megabytes, sha1_of, write_atomic
from deeprnn.data.urls import redact_url

__all__ = ["CorpusFile", "DownloadError", "TransientDownloadError", "read_text_chunks", "redact_url"]  # re-exported

log = logging.getLogger(__name__)

CACHE_ENV = "DEEPRNN_CACHE_DIR"
_SUFFIXES: dict[CorpusKind, str] = {"text": ".txt", "gzip": ".gz"}  # how a cached copy is named, by kind


def cache_dir() -> Path:
    """The cache folder: ``$DEEPRNN_CACHE_DIR`` if set, else the platform's user cache folder."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    import platformdirs  # small, but only needed here

    return Path(platformdirs.user_cache_dir("deeprnn"))


def _local_path(source: str) -> Path | None:
    """The path for ``file://`` URLs and plain paths, None for http(s); refuse every other scheme."""
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        return Path(unquote(parts.path))
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # a bare path (or a Windows drive letter)
        return Path(source).expanduser()
    raise DownloadError(f"unsupported URL scheme {scheme!r} in {redact_url(source)!r}: use http, https, file or a path")


def _check_sha1(have: str, expected: str | None, shown: str) -> None:
    if expected and have != expected:
        raise DownloadError(
            f"sha1 mismatch for {shown}: expected {expected}, got {have}. "
            "The file changed or the wrong URL was given; nothing was cached"
        )


def _check_present(path: Path) -> None:
    """Refuse a local corpus that is missing, neither a file nor a folder, or that this user may not read."""
    if not path.exists():
        raise DownloadError(f"corpus file not found: {path}")
    if not (path.is_file() or path.is_dir()):
        raise DownloadError(f"{path} is neither a file nor a folder: give a text file, a .gz file or a folder")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise DownloadError(f"cannot read the corpus {path}: permission denied")


def check_source(source: str) -> None:
    """Refuse at once, without reading a byte of it, a source that cannot work: a scheme other than http(s),
    file or a path, a local file or folder that is missing or unreadable, or a folder with a symbolic link that
    leads out of it (``dir_files``). A URL is left to the download."""
    local = _local_path(source)
    if local is not None:
        _check_present(local)
        if local.is_dir():
            corpus_stream.dir_files(local)  # only the listing: a link out of it is refused before anything starts


def _read_local(path: Path, expected: str | None) -> CorpusFile:
    """Check a local file or folder in place, in one streamed pass (every byte hashed and checked, decompressed
    for gzip), and return its identity."""
    _check_present(path)
    shown = str(path)
    try:
        if path.is_dir():
            kind: CorpusKind = "dir"
            digest = hashlib.sha1()
            deque(corpus_stream.dir_text(path, shown, digest), maxlen=0)  # the checks and the hash, not the text
            have, size = digest.hexdigest(), sum(p.stat().st_size for _, p in corpus_stream.dir_files(path))
        else:
            # With an expected hash, a bad text is reported only after the hash: a wrong file is the first fault.
            sink = corpus_stream.ByteSink(shown, defer=expected is not None)
            deque(corpus_stream.feed_file(sink, path, corpus_stream.READ_CHUNK), maxlen=0)
            have, size = sink.sha1.hexdigest(), sink.num_bytes
            kind = "gzip" if sink.kind == "gzip" else "text"  # found by the gzip magic bytes, as the sink read them
    except OSError as exc:  # unreadable: permissions, a file removed while reading, ...
        raise DownloadError(f"cannot read the corpus {exc.filename or path}: {exc.strerror or exc}") from None
    _check_sha1(have, expected, shown)
    return CorpusFile(path, have, shown, size, kind)


def _cached(base: Path, expected: str | None, shown: str) -> CorpusFile | None:
    """The cached copy when its hash matches the expected (or recorded) one; a corrupted one is removed."""
    record = base.with_suffix(".sha1")
    for kind, suffix in _SUFFIXES.items():
        copy = base.with_suffix(suffix)
        if not copy.is_file():
            continue
        want = expected or (record.read_text().strip() if record.is_file() else None)
        have = sha1_of(copy)
        if want and have == want:
            log.info("using cached corpus %s (sha1 %s)", copy, have)
            return CorpusFile(copy, have, shown, copy.stat().st_size, kind)
        log.warning("cached corpus %s has sha1 %s, expected %s: fetching it again", copy, have, want)
        copy.unlink(missing_ok=True)
    return None


def _get(url: str, shown: str, timeout: float) -> requests.Response:
    """Send the GET (streamed: the body is read later); map refusals and 4xx/5xx to clear errors."""
    try:
        # verify=True is requests' default; stated so that nobody turns TLS checks off by accident.
        response = requests.get(url, stream=True, timeout=timeout, verify=True)
    except requests.exceptions.SSLError as exc:
        raise DownloadError(f"TLS verification failed for {shown}: {exc}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransientDownloadError(
            f"could not reach {shown} ({type(exc).__name__}); check the URL and network"
        ) from None
    except requests.exceptions.RequestException as exc:  # a malformed URL and the like; its text may hold it
        raise DownloadError(f"cannot fetch {shown} ({type(exc).__name__}): check the URL") from None
    if response.status_code >= 400:
        code, reason = response.status_code, response.reason
        response.close()
        if code >= 500:
            raise TransientDownloadError(f"HTTP {code} {reason} for {shown} (a server fault, worth retrying later)")
        raise DownloadError(f"HTTP {code} {reason} for {shown} (check the URL)")
    return response


def _download(url: str, base: Path, expected: str | None, timeout: float) -> CorpusFile:
    """One streamed download into the cache, hashed and checked on the way: a temporary file, fsynced and
    renamed into place only once verified."""
    shown = redact_url(url)
    log.info("downloading %s", shown)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=base.parent, prefix=".part-", suffix=".tmp")
    except OSError as exc:
        raise _cache_error(base.parent, exc) from None
    tmp, size, target = Path(name), None, None  # size: the body's length, when the server says it
    sink = corpus_stream.ByteSink(shown, defer=expected is not None)
    try:
        with os.fdopen(fd, "wb") as fh, _get(url, shown, timeout) as response:
            length = response.headers.get("Content-Length", "")
            size = int(length) if length.isdigit() else None
            for chunk in response.iter_content(corpus_stream.READ_CHUNK):
                fh.write(chunk)
                deque(sink.feed(chunk), maxlen=0)  # only the checks and the hash: the text is not kept
            _check_sha1(sink.sha1.hexdigest(), expected, shown)  # the hash first: a wrong file is the first fault
            deque(sink.finish(), maxlen=0)
            fh.flush()
            os.fsync(fh.fileno())
        kind: CorpusKind = "gzip" if sink.kind == "gzip" else "text"
        target = base.with_suffix(_SUFFIXES[kind])
        os.replace(tmp, target)
        for other in set(_SUFFIXES.values()) - {target.suffix}:  # a copy of another kind under this name is stale
            base.with_suffix(other).unlink(missing_ok=True)
        write_atomic(base.with_suffix(".sha1"), (sink.sha1.hexdigest() + "\n").encode())
    except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
        raise TransientDownloadError(
            f"the download of {shown} broke off ({type(exc).__name__}); nothing was cached"
        ) from None
    except requests.exceptions.ContentDecodingError as exc:
        raise DownloadError(f"{shown} sent a body its Content-Encoding does not decode: {exc}") from None
    except OSError as exc:  # the disk's fault: requests' errors of a broken transfer are caught above
        written = tmp.stat().st_size if tmp.exists() else None
        if target is not None:
            target.unlink(missing_ok=True)  # without its record it would not be trusted: keep nothing
        raise _cache_error(base.parent, exc, size, written) from None
    finally:
        tmp.unlink(missing_ok=True)
    log.info("saved %s (%d bytes, sha1 %s)", target, sink.num_bytes, sink.sha1.hexdigest())
    return CorpusFile(target, sink.sha1.hexdigest(), shown, sink.num_bytes, kind)


def _cache_error(folder: Path, exc: OSError, size: int | None = None, written: int | None = None) -> DownloadError:
    """The disk, not the network, failed (full, read-only, not a folder): say where, how much, and what to do."""
    sizes = [f"the download is {megabytes(size)}"] if size is not None else []
    sizes += [f"{megabytes(written)} were written, and removed"] if written else []
    told = f" ({'; '.join(sizes)})" if sizes else ""
    return DownloadError(
        f"cannot write the corpus into the cache {folder}: {exc.strerror or exc}{told}. "
        f"Free some space there, or set {CACHE_ENV} to another folder"
    )


def fetch_corpus(
    source: str, expected_sha1: str | None = None, *, cache: Path | None = None, timeout: float = 30.0
) -> CorpusFile:
    """Return a verified local corpus for ``source`` (URL, path or folder), downloading only when the cache
    lacks it.

    With ``expected_sha1`` the content must match it; without one, the hash recorded at the first download
    guards the cached copy against corruption. One attempt: a network fault raises ``TransientDownloadError``
    for the caller to retry (the ``download-corpus`` task does, with Prefect's retries).
    """
    expected = expected_sha1.lower() if expected_sha1 else None
    local = _local_path(source)
    if local is not None:
        return _read_local(local, expected)
    # The cached copy's path without its suffix (.txt or .gz, by kind; its record adds .sha1): never derived
    # from the user's file name, so nothing can escape the cache folder.
    name = expected or f"url-{hashlib.sha256(source.encode()).hexdigest()[:24]}"
    base = (cache if cache is not None else cache_dir()) / name
    return _cached(base, expected, redact_url(source)) or _download(source, base, expected, timeout)
