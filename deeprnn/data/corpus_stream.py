"""Reading a corpus as a stream: text checks, gzip, directories of text files, in bounded memory.

Everything here reads bytes in chunks and never holds a whole file. One pass both hashes the bytes (the
corpus's SHA-1) and checks them: not empty, no NUL bytes, strict UTF-8 (an incremental decoder, so a
multi-byte character split across two chunks is fine and an invalid byte is reported at its offset in the
whole text). A UTF-8 byte order mark at the start of a file is dropped from its text, as text tools do: it
marks the encoding and is no character of the text (the SHA-1 still covers it). ``.gz`` corpora
(recognised by the gzip magic bytes ``1f 8b``, whatever the name) are decompressed on the fly; their SHA-1
is that of the compressed bytes, the file as served.

``deeprnn.data.download`` fetches corpora with these; ``read_text_chunks`` (re-exported there) is how the next
stage reads one.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from hashlib import _Hash

CorpusKind = Literal["text", "gzip", "dir"]
GZIP_MAGIC = b"\x1f\x8b"
BOM = "\ufeff"  # U+FEFF at the very start of a text: a byte order mark (EF BB BF in UTF-8)
READ_CHUNK = 1 << 16  # what the checks read at a time when nothing asks for more


class DownloadError(RuntimeError):
    """The corpus could not be fetched or is not what was expected; the message says what to fix."""


class TransientDownloadError(DownloadError):
    """A network fault worth retrying later: timeout, refused connection, HTTP 5xx, a broken transfer."""


@dataclass(frozen=True)
class CorpusFile:
    """A verified local corpus and its identity.

    ``kind`` says how to read ``path``: ``text`` (a UTF-8 file), ``gzip`` (a gzip-compressed UTF-8 file) or
    ``dir`` (a folder of UTF-8 or gzip files, see ``dir_files``). ``sha1`` and ``num_bytes`` are those of the
    bytes on disk: the compressed bytes for ``gzip``; for ``dir``, the folder digest that ``dir_text`` defines
    and the files' total size. Read the text with ``read_text_chunks``.
    """

    path: Path
    sha1: str
    source: str  # the URL or path it came from, with any credentials removed
    num_bytes: int
    kind: CorpusKind = "text"


class ByteSink:
    """What the bytes of one text or gzip corpus pass through once: SHA-1, gzip detection, text checks.

    Feed it the bytes as they come (from the network or a file); ``feed`` and ``finish`` yield the text, and
    ``finish`` ends the checks: no NUL bytes, strict UTF-8 (an invalid byte reported at its offset in the whole
    text), not blank (unless ``blank_ok``: one file of a folder). The text leaves out a byte order mark at its
    start. With ``defer``, a bad text is remembered instead of raised, so that the SHA-1 of a wrong file is
    still computed and a hash mismatch (the more basic fault) can be reported first; ``finish`` raises it.
    ``feed`` and ``finish`` are generators: iterate them, even when only checking, or nothing happens.

    A gzip file is decompressed in pieces of at most ``out_max`` bytes, corrupt or truncated input being one
    clear error. Files of several members (``cat a.gz b.gz``, bgzip, pigz) and zero padding after the last
    member are read as ``gzip`` reads them; the CRC and length in each member's trailer are checked by zlib.
    """

    def __init__(self, shown: str, *, defer: bool = False, out_max: int = READ_CHUNK, blank_ok: bool = False) -> None:
        self.shown, self.defer, self.out_max, self.blank_ok = shown, defer, max(1, out_max), blank_ok
        self.sha1 = hashlib.sha1()
        self.num_bytes = 0
        self.kind: CorpusKind | None = None  # known once two bytes are in
        self.head = b""
        self.inflate: zlib._Decompress | None = None  # gzip: None between members (and before the first)
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.offset = 0  # bytes of text (decompressed for gzip) decoded so far
        self.has_text = False  # any character that is not ASCII whitespace (nor the byte order mark) seen
        self.at_start = True  # no character decoded yet: a byte order mark now is dropped
        self.fault: DownloadError | None = None

    def feed(self, data: bytes) -> Iterator[str]:
        """Take the next bytes; yield their text."""
        self.sha1.update(data)
        self.num_bytes += len(data)
        if self.kind is None:
            self.head += data
            if len(self.head) < len(GZIP_MAGIC):
                return
            data, self.head = self.head, b""
            self.kind = "gzip" if data.startswith(GZIP_MAGIC) else "text"
        yield from self._guarded(self._check(data))

    def finish(self) -> Iterator[str]:
        """No more bytes: end the checks (yield the last text); raise a deferred fault."""
        if self.kind is None:  # fewer bytes than the gzip magic has
            self.kind = "text"
            yield from self._guarded(self._check(self.head))
        yield from self._guarded(self._end())
        if self.fault is not None:
            raise self.fault

    def _check(self, data: bytes) -> Iterator[str]:
        for piece in self._gunzip(data) if self.kind == "gzip" else (data,):
            if b"\x00" in piece:
                raise DownloadError(f"{self.shown} looks binary (it contains NUL bytes): give a UTF-8 text file")
            text = self._decode(piece)
            if text:
                yield text

    def _gunzip(self, data: bytes) -> Iterator[bytes]:
        """Decompress the next bytes; yield the output in pieces of at most ``out_max`` bytes."""
        while True:
            if self.inflate is None:
                data = data.lstrip(b"\x00")  # zero padding after a member
                if not data:
                    return
                self.inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # 16+: gzip header and trailer
            try:
                out = self.inflate.decompress(data, self.out_max)
            except zlib.error as exc:
                raise self._bad_gzip(str(exc)) from None
            if out:
                yield out
            if self.inflate.eof:
                data, self.inflate = self.inflate.unused_data, None
            elif not self.inflate.unconsumed_tail and len(out) < self.out_max:
                return  # all input used and no output held back
            else:
                data = self.inflate.unconsumed_tail

    def _end(self) -> Iterator[str]:
        if self.inflate is not None:  # a gzip file cut off inside a member
            raise self._bad_gzip("it ends before its compressed data does (truncated)")
        tail = self._decode(b"", final=True)
        if not self.blank_ok and not self.has_text:
            raise DownloadError(f"{self.shown} is empty: a corpus needs text")
        if tail:
            yield tail

    def _decode(self, piece: bytes, final: bool = False) -> str:
        """The text of the next bytes, without a byte order mark at the start of the whole text; notes whether
        the text has any; a byte that is not UTF-8 is refused at its offset in the whole text."""
        pending = len(self.decoder.getstate()[0])  # bytes of a character begun in the previous piece
        self.offset += len(piece)
        try:
            text = self.decoder.decode(piece, final)
        except UnicodeDecodeError as exc:
            where = " of the decompressed text" if self.kind == "gzip" else ""
            offset = self.offset - len(piece) - pending + exc.start
            raise DownloadError(
                f"{self.shown} is not UTF-8 text (invalid byte at offset {offset}{where}): convert it to UTF-8 first"
            ) from None
        if self.at_start and text:
            self.at_start = False
            text = text.removeprefix(BOM)
        self.has_text = self.has_text or bool(text.strip(" \t\n\r\x0b\x0c"))  # ASCII whitespace, as bytes.strip
        return text

    def _bad_gzip(self, reason: str) -> DownloadError:
        return DownloadError(
            f"{self.shown} is not a valid gzip file: {reason}. Fetch it again, or give the uncompressed text"
        )

    def _guarded(self, pieces: Iterator[str]) -> Iterator[str]:
        if self.fault is not None:
            return  # already refused: only the hash still matters
        try:
            yield from pieces
        except DownloadError as exc:
            if not self.defer:
                raise
            self.fault = exc


def dir_files(root: Path) -> list[tuple[str, Path]]:
    """The files of a corpus folder as ``(relative POSIX path, path)``, sorted by the relative path (as Python
    compares strings), found recursively; hidden files and folders (names starting with ``.``, such as
    ``.git``) are skipped, and so are folders reached through symbolic links.

    A symbolic link to a file inside the folder is read as that file; one that leads out of the folder raises
    ``DownloadError`` naming the link and its target, so no file from elsewhere joins the corpus unseen."""
    found: list[tuple[str, Path]] = []
    inside = root.resolve()
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if name.startswith(".") or not path.is_file():
                continue
            # A link leading out is refused rather than skipped: the folder lists the file, so leaving it out
            # would train on less than the user sees there, and reading it would train on a file from elsewhere.
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise DownloadError(
                    f"{path} is a symbolic link to {path.resolve()}, outside the corpus folder {inside}: copy that "
                    "file into the folder, or remove the link"
                )
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def dir_text(root: Path, shown: str, digest: _Hash, chunk_bytes: int = READ_CHUNK) -> Iterator[str]:
    """Check and yield the text of every file of a corpus folder, in ``dir_files`` order;
    a gzip file in it (found by its magic bytes) is decompressed.

    The folder digest is fed into ``digest``: for each file in that order, its relative POSIX path (its bytes
    as the file system has them: UTF-8 for ordinary names), a NUL byte, its size in bytes as decimal ASCII
    digits, a NUL byte, then its bytes as stored (compressed for a gzip file). A non-empty file whose text does
    not end with ``"\\n"`` is followed by one, so that no token spans two files. Refused, naming the file: a
    binary, non-UTF-8 or corrupt gzip file; naming the folder: one with no files, or whose files are all blank.
    """
    files = dir_files(root)
    if not files:
        raise DownloadError(f"{shown} holds no text files (hidden files and folders are skipped): add some")
    has_text = False
    for rel, path in files:
        digest.update(os.fsencode(rel) + b"\x00" + str(path.stat().st_size).encode() + b"\x00")
        sink = ByteSink(str(path), out_max=chunk_bytes, blank_ok=True)
        last = ""
        for last in feed_file(sink, path, chunk_bytes, digest):
            yield last
        has_text = has_text or sink.has_text
        if last and not last.endswith("\n"):
            yield "\n"
    if not has_text:
        raise DownloadError(f"{shown} is empty: a corpus needs text (every file in it is blank)")


def feed_file(sink: ByteSink, path: Path, chunk_bytes: int, digest: _Hash | None = None) -> Iterator[str]:
    """Every byte of the file at ``path`` fed through ``sink`` (and into ``digest``), then its end; yields what
    the sink yields: the text."""
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            if digest is not None:
                digest.update(chunk)
            yield from sink.feed(chunk)
    yield from sink.finish()


def read_text_chunks(corpus: CorpusFile, chunk_bytes: int = 1 << 24) -> Iterator[str]:
    """The corpus's text in order, in pieces, decoded strictly as UTF-8, in memory bounded by ``chunk_bytes``.

    ``gzip`` corpora are decompressed on the fly; a ``dir`` corpus gives each file's text in sorted order of
    its relative path, a ``"\\n"`` after each non-empty file that does not end with one. The same checks as at
    fetch time run again, and the bytes are hashed on the way: a file changed since ``fetch_corpus`` verified
    it raises ``DownloadError`` after its last piece, so nothing built from it should be kept. Raises
    ``DownloadError`` (binary, not UTF-8, not a valid gzip file, ...) with the message saying what to fix.
    """
    chunk_bytes = max(1, chunk_bytes)
    shown = str(corpus.path)
    if corpus.kind == "dir":
        digest = hashlib.sha1()
        yield from dir_text(corpus.path, shown, digest, chunk_bytes)
        have = digest.hexdigest()
    else:
        sink = ByteSink(shown, out_max=chunk_bytes)
        yield from feed_file(sink, corpus.path, chunk_bytes)
        have = sink.sha1.hexdigest()
    if have != corpus.sha1:
        raise DownloadError(
            f"{shown} changed since it was fetched (sha1 {corpus.sha1}, now {have}): fetch the corpus again"
        )
