"""Stage 1: fetch the corpus into a local, hash-checked cache.

Sources are ``http(s)://`` URLs (fetched with ``requests``), ``file://`` URLs and local paths. Downloads are
verified (SHA-1 when one is expected, UTF-8 text always) before they are moved atomically into the cache, so
a failed or tampered download never leaves a file behind. A cached file is reused only while its hash still
matches, so a corrupted cache is fetched again and a valid one needs no network.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

CACHE_ENV = "DEEPRNN_CACHE_DIR"
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """The corpus could not be fetched or is not what was expected; the message says what to fix."""


class TransientDownloadError(DownloadError):
    """A network fault worth retrying later: timeout, refused connection, HTTP 5xx."""


@dataclass(frozen=True)
class CorpusFile:
    """A verified local copy of the corpus and its identity."""

    path: Path
    sha1: str
    source: str  # the URL or path it came from, with any credentials removed
    num_bytes: int


def cache_dir() -> Path:
    """The cache folder: ``$DEEPRNN_CACHE_DIR`` if set, else the platform's user cache folder."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs  # small, but only needed here

    return Path(platformdirs.user_cache_dir("deeprnn"))


def redact_url(url: str) -> str:
    """The URL without user name or password, safe for logs, params and tags."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]  # host[:port] as written, so [IPv6] keeps its brackets
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def sha1_of(path: Path) -> str:
    """SHA-1 of a file, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_text(data: bytes, source: str) -> None:
    """Refuse what cannot be a text corpus: empty, binary (NUL bytes) or not UTF-8."""
    if not data.strip():
        raise DownloadError(f"{source} is empty: a corpus needs text")
    if b"\x00" in data[:_CHUNK]:
        raise DownloadError(f"{source} looks binary (it contains NUL bytes): give a UTF-8 text file")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DownloadError(
            f"{source} is not UTF-8 text (invalid byte at offset {exc.start}): convert it to UTF-8 first"
        ) from None


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


def _cache_name(source: str, expected_sha1: str | None) -> str:
    # Never derived from the user's file name, so nothing can escape the cache folder.
    if expected_sha1:
        return f"{expected_sha1}.txt"
    return f"url-{hashlib.sha256(source.encode()).hexdigest()[:24]}.txt"


def cached_copy(source: str, expected_sha1: str | None = None, cache: Path | None = None) -> Path:
    """Where ``fetch_corpus`` keeps (or would keep) ``source``; a local source is its own copy."""
    local = _local_path(source)
    if local is not None:
        return local
    folder = cache if cache is not None else cache_dir()
    return folder / _cache_name(source, expected_sha1.lower() if expected_sha1 else None)


def valid_cached_sha1(source: str, expected_sha1: str | None = None, cache: Path | None = None) -> str | None:
    """The SHA-1 of the copy ``fetch_corpus`` would use right now, or None when that copy is missing or fails
    its hash check (so a fetch must run)."""
    copy = cached_copy(source, expected_sha1, cache)
    if not copy.is_file():
        return None
    have = sha1_of(copy)
    record = copy.with_suffix(".sha1")
    if expected_sha1:
        want = expected_sha1.lower()
    elif _local_path(source) is not None:
        want = have  # a local file is its own reference
    else:
        want = record.read_text().strip() if record.is_file() else None
    return have if have == want else None


def _session(retries: int) -> requests.Session:
    """A session that retries connection errors and 5xx with exponential backoff (never 4xx)."""
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=0.5,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=frozenset({"GET"}),
        raise_on_status=False,
    )
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


def _fetch_http(url: str, timeout: float, retries: int) -> bytes:
    shown = redact_url(url)
    try:
        # verify=True is requests' default; stated so that nobody turns TLS checks off by accident.
        with _session(retries) as session:
            response = session.get(url, timeout=timeout, verify=True)
    except requests.exceptions.SSLError as exc:
        raise DownloadError(f"TLS verification failed for {shown}: {exc}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise TransientDownloadError(
            f"could not reach {shown} after {retries + 1} attempts ({type(exc).__name__}); check the URL and network"
        ) from None
    try:
        response.raise_for_status()
    except requests.HTTPError:
        code = response.status_code
        kind = TransientDownloadError if code >= 500 else DownloadError
        hint = "retried, still failing" if code >= 500 else "check the URL"
        raise kind(f"HTTP {code} {response.reason} for {shown} ({hint})") from None
    return response.content


def _atomic_write(data: bytes, target: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers see all or nothing."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_corpus(
    source: str,
    expected_sha1: str | None = None,
    *,
    cache: Path | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> CorpusFile:
    """Return a verified local copy of ``source`` (URL or path), downloading only when the cache lacks it.

    With ``expected_sha1`` the content must match it; without one, the hash recorded at the first download
    guards the cached copy against corruption.
    """
    expected = expected_sha1.lower() if expected_sha1 else None
    shown = redact_url(source)
    local = _local_path(source)
    if local is not None:
        # Local files are read in place: nothing to cache, but the same checks apply.
        if not local.is_file():
            raise DownloadError(f"corpus file not found: {local}")
        data = local.read_bytes()
        _verify(data, expected, shown)
        return CorpusFile(local, hashlib.sha1(data).hexdigest(), str(local), len(data))

    target = cached_copy(source, expected, cache)
    record = target.with_suffix(".sha1")
    if target.is_file():
        want = expected or (record.read_text().strip() if record.is_file() else None)
        have = sha1_of(target)
        if want and have == want:
            log.info("using cached corpus %s (sha1 %s)", target, have)
            return CorpusFile(target, have, shown, target.stat().st_size)
        log.warning("cached corpus %s has sha1 %s, expected %s: fetching it again", target, have, want)
        target.unlink(missing_ok=True)

    log.info("downloading %s", shown)
    data = _fetch_http(source, timeout, retries)
    digest = _verify(data, expected, shown)
    _atomic_write(data, target)
    _atomic_write(digest.encode() + b"\n", record)
    log.info("saved %s (%d bytes, sha1 %s)", target, len(data), digest)
    return CorpusFile(target, digest, shown, len(data))


def _verify(data: bytes, expected: str | None, shown: str) -> str:
    digest = hashlib.sha1(data).hexdigest()
    if expected and digest != expected:
        raise DownloadError(
            f"sha1 mismatch for {shown}: expected {expected}, got {digest}. "
            "The file changed or the wrong URL was given; nothing was cached"
        )
    check_text(data, shown)
    return digest


def read_text_chunks(corpus: CorpusFile, chunk_bytes: int = 1 << 24) -> Iterator[str]:
    """The corpus's text in order, decoded as UTF-8 chunk by chunk (a multi-byte character split between two
    chunks is decoded whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(corpus.path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            text = decoder.decode(block)
            if text:
                yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
