"""Reading corpora as streams: folders of text files, local gzip files, chunk boundaries, bounded pieces."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from pathlib import Path

import pytest

from deeprnn.data.download import CorpusFile, DownloadError, check_source, fetch_corpus, read_text_chunks


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _digest(files: list[tuple[str, bytes]]) -> str:
    """The folder digest as the docstring of ``dir_text`` defines it, computed here independently."""
    digest = hashlib.sha1()
    for rel, data in files:
        digest.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return digest.hexdigest()


FOLDER = {
    "b.txt": b"zweite Datei, ohne Zeilenende",
    "a/z.txt": b"in a folder\n",
    "a.txt": "erste: Über die Brücke\n".encode(),
    "c.txt.gz": gzip.compress(b"komprimiert, ohne Zeilenende", mtime=0),
    "empty.txt": b"",
    ".hidden.txt": b"\x00 never read",
    ".git/objects/x": b"\x00\x01 never read",
    "a/.cache/y.txt": b"\xff never read",
}


def test_a_folder_reads_in_sorted_order_with_a_newline_between_files(tmp_path: Path) -> None:
    root = _tree(tmp_path / "corpus", FOLDER)
    got = fetch_corpus(str(root), cache=tmp_path / "cache")
    # "." sorts before "/"; hidden files and folders are skipped.
    order = ["a.txt", "a/z.txt", "b.txt", "c.txt.gz", "empty.txt"]
    assert got.kind == "dir" and got.path == root
    assert got.sha1 == _digest([(rel, FOLDER[rel]) for rel in order])
    assert got.num_bytes == sum(len(FOLDER[rel]) for rel in order)
    text = "".join(read_text_chunks(got, chunk_bytes=5))
    # b.txt and c.txt.gz (decompressed) get the newline they lack; a.txt and a/z.txt keep their own one; the
    # empty file adds nothing. The digest covers the gzip file's own bytes.
    expected = [
        "erste: Über die Brücke",
        "in a folder",
        "zweite Datei, ohne Zeilenende",
        "komprimiert, ohne Zeilenende",
    ]
    assert text == "\n".join(expected) + "\n"
    assert fetch_corpus(root.as_uri(), got.sha1).sha1 == got.sha1  # a file:// URL and a pinned hash
    assert not (tmp_path / "cache").exists()  # read in place


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "b.txt").rename(root / "c.txt"),  # a file's name
        lambda root: (root / "a" / "z.txt").write_bytes(b"in a folder!"),  # a byte
        lambda root: (root / "a" / "z.txt").write_bytes(b"in a folder"),  # its length
        lambda root: (root / "new.txt").write_bytes(b""),  # a new, empty file
    ],
)
def test_the_folder_digest_changes_with_any_name_or_byte(tmp_path: Path, change) -> None:
    root = _tree(tmp_path / "corpus", FOLDER)
    before = fetch_corpus(str(root)).sha1
    change(root)
    assert fetch_corpus(str(root)).sha1 != before
    with pytest.raises(DownloadError, match="sha1 mismatch"):
        fetch_corpus(str(root), before)


def test_a_folder_without_text_files_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "corpus", {".git/HEAD": b"ref: main\n", ".notes": b"x"})
    (root / "sub").mkdir()
    with pytest.raises(DownloadError, match=f"{re.escape(str(root))} holds no text files"):
        fetch_corpus(str(root))
    blank = _tree(tmp_path / "blank", {"a.txt": b"\n\n", "b.txt": b" "})
    with pytest.raises(DownloadError, match="is empty"):
        fetch_corpus(str(blank))


@pytest.mark.parametrize(
    "bad, words",
    [
        (b"PNG\x00\x00", "looks binary"),
        (b"ok\n" * 10 + "café".encode("latin-1"), r"is not UTF-8 text \(invalid byte at offset 33\)"),
        (gzip.compress(b"text", mtime=0)[:-5], "is not a valid gzip file: .*truncated"),
    ],
    ids=["binary", "latin-1", "truncated-gzip"],  # the same ids in every test process
)
def test_a_folder_with_a_file_that_is_not_text_names_that_file(tmp_path: Path, bad: bytes, words: str) -> None:
    root = _tree(tmp_path / "corpus", {"a.txt": b"fine\n", "sub/picture.png": bad, "z.txt": b"fine\n"})
    with pytest.raises(DownloadError, match=f"{re.escape(str(root / 'sub' / 'picture.png'))} {words}"):
        fetch_corpus(str(root))


def test_a_symbolic_link_inside_the_folder_is_read_and_one_leading_out_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "corpus", {"a.txt": b"first\n", "sub/b.txt": b"second\n"})
    (root / "c.txt").symlink_to(Path("sub") / "b.txt")  # relative, to a file inside the folder
    (root / "sub" / "d.txt").symlink_to(root / "a.txt")  # absolute, to a file inside the folder
    got = fetch_corpus(str(root))
    assert "".join(read_text_chunks(got)) == "first\nsecond\nsecond\nfirst\n"  # a, c, sub/b, sub/d

    # A system file every machine has, and a file beside the folder reached through a link inside it.
    outside = Path("/etc/hostname") if Path("/etc/hostname").is_file() else Path(os.__file__)
    (tmp_path / "secret.txt").write_bytes(b"not corpus\n")
    for link, target in [(root / "z.txt", outside), (root / "sub" / "y.txt", Path("..") / ".." / "secret.txt")]:
        link.symlink_to(target)
        shown = re.escape(f"{link} is a symbolic link to {(link.parent / target).resolve()}, outside the corpus")
        with pytest.raises(DownloadError, match=shown):
            check_source(str(root))  # the listing alone: before anything is read
        with pytest.raises(DownloadError, match=shown):
            fetch_corpus(str(root))
        link.unlink()
    # A link to a link inside that leads out: followed to the end.
    (root / "hop.txt").symlink_to(tmp_path / "secret.txt")
    (root / "sub" / "e.txt").symlink_to(root / "hop.txt")
    with pytest.raises(DownloadError, match=re.escape(f"{root / 'hop.txt'} is a symbolic link")):
        check_source(str(root))
    (root / "hop.txt").unlink()  # dangling now: neither a file nor read
    assert fetch_corpus(str(root)).sha1 == got.sha1


def test_a_local_gzip_file_is_read_in_place_and_decompressed(tmp_path: Path) -> None:
    text = "Über die Brücke gingen die Mädchen.\n中文文本。\n" * 500
    path = tmp_path / "corpus.txt.gz"
    # Two gzip members and zero padding, as concatenating files or some compressors leave them.
    path.write_bytes(gzip.compress(text[:1000].encode()) + gzip.compress(text[1000:].encode()) + b"\0" * 10)
    got = fetch_corpus(str(path), cache=tmp_path / "cache")
    assert (got.kind, got.path, got.sha1) == ("gzip", path, hashlib.sha1(path.read_bytes()).hexdigest())
    assert got.num_bytes == path.stat().st_size
    for chunk_bytes in (1, 7, 4096, 1 << 24):
        assert "".join(read_text_chunks(got, chunk_bytes)) == text
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DownloadError, match=f"{re.escape(str(path))} is not a valid gzip file: .*truncated"):
        fetch_corpus(str(path))


def test_pieces_stay_within_chunk_bytes_however_well_the_text_compresses(tmp_path: Path) -> None:
    path = tmp_path / "repetitive.gz"
    path.write_bytes(gzip.compress(b"a" * 5_000_000))  # about 5 KB of gzip for 5 MB of text
    got = fetch_corpus(str(path))
    pieces = list(read_text_chunks(got, chunk_bytes=4096))
    assert max(len(p) for p in pieces) <= 4096 and sum(len(p) for p in pieces) == 5_000_000
    plain = tmp_path / "plain.txt"
    plain.write_bytes("é".encode() * 10_000)
    assert max(len(p.encode()) for p in read_text_chunks(fetch_corpus(str(plain)), chunk_bytes=1000)) <= 1000


def _as_corpus(path: Path) -> CorpusFile:
    return CorpusFile(path, hashlib.sha1(path.read_bytes()).hexdigest(), str(path), path.stat().st_size, "text")


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 8, 1 << 16])
def test_a_character_split_across_chunks_decodes(tmp_path: Path, chunk_bytes: int) -> None:
    text = "aé€\U0001f600ü中" * 50  # 1, 2, 3 and 4 bytes per character
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    assert "".join(read_text_chunks(_as_corpus(path), chunk_bytes)) == text


@pytest.mark.parametrize("chunk_bytes", [1, 4, 7, 8, 9, 64])
def test_an_invalid_byte_across_a_chunk_boundary_reports_its_offset_in_the_whole_text(
    tmp_path: Path, chunk_bytes: int
) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"abcdefg\xe2\x82(rest of the text\n")  # a 3-byte character cut off by "(" at offset 9
    with pytest.raises(DownloadError, match=r"not UTF-8 text \(invalid byte at offset 7\)"):
        "".join(read_text_chunks(_as_corpus(path), chunk_bytes))
    # The fetch-time check reads 64 KiB at a time: put the cut character across that boundary.
    path.write_bytes(b"a" * 65_535 + b"\xe2\x82" + b"(more")
    with pytest.raises(DownloadError, match=r"invalid byte at offset 65535\)"):
        fetch_corpus(str(path))
    path.write_bytes(b"ends inside a character \xf0\x9f\x98")
    with pytest.raises(DownloadError, match=r"invalid byte at offset 24\)"):
        fetch_corpus(str(path))


def test_reading_a_corpus_that_changed_since_it_was_fetched_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"the original text\n")
    got = fetch_corpus(str(path))
    path.write_bytes(b"another text, same length? no\n")
    with pytest.raises(DownloadError, match="changed since it was fetched"):
        list(read_text_chunks(got))
    path.write_bytes(b"text\x00")
    with pytest.raises(DownloadError, match="looks binary"):
        list(read_text_chunks(got))


def test_a_path_that_is_neither_file_nor_folder_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with pytest.raises(DownloadError, match="is neither a file nor a folder"):
        fetch_corpus(str(fifo))


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 4, 1 << 16])
def test_a_byte_order_mark_at_the_start_of_a_file_is_dropped(tmp_path: Path, chunk_bytes: int) -> None:
    text = "The Time Traveller\n\ufeffinside the text it is a character\n"
    plain = tmp_path / "bom.txt"
    plain.write_bytes(BOM + text.encode())
    packed = tmp_path / "bom.txt.gz"
    packed.write_bytes(gzip.compress(BOM + text.encode(), mtime=0))
    folder = _tree(tmp_path / "dir", {"a.txt": BOM + b"first", "b.txt": BOM + b"second\n"})
    for path, expected in ((plain, text), (packed, text), (folder, "first\nsecond\n")):
        got = fetch_corpus(str(path))
        assert "".join(read_text_chunks(got, chunk_bytes)) == expected, path
    assert fetch_corpus(str(plain)).sha1 == hashlib.sha1(plain.read_bytes()).hexdigest()  # the file as it is
    blank = tmp_path / "blank.txt"
    blank.write_bytes(BOM + b" \n")
    with pytest.raises(DownloadError, match="is empty: a corpus needs text"):
        fetch_corpus(str(blank))
