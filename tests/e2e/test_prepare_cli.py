"""``deeprnn prepare`` as a user runs it: what it prints, the cache it fills, and one clear message (no
traceback, nothing half-written) for each input it cannot use."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from small_disk import small_disk

pytestmark = pytest.mark.e2e

ENGLISH = "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite matter.\n"


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "DEEPRNN_CACHE_DIR": str(cache), "COLUMNS": "80"}  # a narrow log: paths still whole


def _prepare(tmp_path: Path, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = _env(cache or tmp_path / "cache")
    return subprocess.run(
        [sys.executable, "-m", "deeprnn.cli.app", "prepare", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_prepare_prints_the_entry_and_a_second_run_is_served_from_the_cache(tmp_path: Path) -> None:
    corpus = tmp_path / "english.txt"
    corpus.write_text(ENGLISH * 2000, encoding="utf-8")
    args = ("--preset", "d2l-9.3", "--data-url", str(corpus), "--normalize", "none", "--val-fraction", "0.1", "--json")
    first = _prepare(tmp_path, *args, str(tmp_path / "first.json"))
    assert first.returncode == 0, first.stdout + first.stderr
    result = json.loads((tmp_path / "first.json").read_text())
    folder = Path(result["folder"])
    assert folder.parent == tmp_path / "cache" / "tokens" and (folder / "ids.bin").is_file()
    assert str(folder) in first.stdout and "yes, in" in first.stdout
    assert result["vocab_size"] == len(set(ENGLISH)) + 1 and result["num_tokens"] == len(ENGLISH) * 2000
    assert result["splits"]["validation"] == round(len(ENGLISH) * 200) and result["splits"]["train"] == 10_000
    for label in ("vocabulary", "train tokens", "validation tokens", "test tokens", "time"):
        assert label in first.stdout, label
    assert f"{result['vocab_size']:,} tokens (ids stored as uint8)" in first.stdout

    again = _prepare(tmp_path, *args, str(tmp_path / "again.json"))
    assert again.returncode == 0 and "no: served from the cache" in again.stdout
    assert json.loads((tmp_path / "again.json").read_text())["cache_hit"] is True


def test_a_text_losing_letters_to_the_books_rule_gets_a_warning(tmp_path: Path) -> None:
    corpus = tmp_path / "german.txt"
    corpus.write_text("Über die Brücke gingen die Mädchen\n" * 50, encoding="utf-8")
    proc = _prepare(tmp_path, "--preset", "d2l-9.3", "--data-url", str(corpus))  # your own text: `text` keeps all
    assert proc.returncode == 0, proc.stderr
    assert "warning: --normalize d2l keeps only the letters a-z: it dropped 10.3%" in " ".join(proc.stderr.split())
    assert "--normalize none" in proc.stderr


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    chinese = tmp_path / "chinese.txt"
    chinese.write_text("时间机器，是一部小说。\n" * 100, encoding="utf-8")
    corrupt = tmp_path / "corrupt.txt.gz"
    corrupt.write_bytes(gzip.compress(ENGLISH.encode() * 100)[:-30])
    binary = tmp_path / "with-binary"
    binary.mkdir()
    (binary / "a.txt").write_text(ENGLISH, encoding="utf-8")
    (binary / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    empty = tmp_path / "no-text"
    (empty / ".hidden").mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = tmp_path / "words.txt"
    words.write_text(" ".join("".join(letters[(i // 26**k) % 26] for k in range(4)) for i in range(260_000)))
    return {
        "nothing left": (chinese, (), "normalizes to nothing with --normalize d2l"),
        "corrupt gz": (corrupt, (), "is not a valid gzip file"),
        "binary file": (binary, (), "b.png"),
        "no text files": (empty, (), "holds no text files"),
        "huge word vocabulary": (words, ("--token", "word"), "raise --min-freq"),
    }


@pytest.mark.parametrize("case", ["nothing left", "corrupt gz", "binary file", "no text files", "huge word vocabulary"])
def test_bad_input_is_one_clear_message_and_leaves_no_entry(tmp_path: Path, case: str) -> None:
    source, extra, message = _bad_inputs(tmp_path)[case]
    proc = _prepare(tmp_path, "--preset", "d2l-9.3", "--data-url", str(source), *extra)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in " ".join(proc.stderr.split())
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stdout + proc.stderr
    tokens = tmp_path / "cache" / "tokens"
    assert not tokens.exists() or not [p for p in tokens.iterdir() if not p.name.endswith(".lock")]


def test_sigterm_during_prepare_then_the_next_prepare_removes_what_it_left(tmp_path: Path) -> None:
    corpus = tmp_path / "big.txt"
    corpus.write_text(ENGLISH * 500_000, encoding="utf-8")  # 50 MB: about a second of tokenizing
    tokens = tmp_path / "cache" / "tokens"
    args = [sys.executable, "-m", "deeprnn.cli.app", "prepare", "--data-url", str(corpus), "--normalize", "none"]
    proc = subprocess.Popen(args, env=_env(tmp_path / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tokens.is_dir() and any(tokens.glob(".build-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it began building"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what docker stop, systemd and CI runners send
    assert proc.wait(timeout=30) in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert not [p for p in tokens.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock")]

    again = _prepare(tmp_path, "--data-url", str(corpus), "--normalize", "none")
    assert again.returncode == 0 and "yes, in" in again.stdout, again.stderr
    assert sorted(p.name for p in tokens.glob(".build-*")) == []  # whatever the stopped build left is gone
    assert _prepare(tmp_path, "--data-url", str(corpus), "--normalize", "none").returncode == 0


def test_a_full_disk_under_the_token_cache_is_one_message(tmp_path: Path) -> None:
    corpus = tmp_path / "english.txt"
    corpus.write_text(ENGLISH * 40_000, encoding="utf-8")  # 4 MB of text; the disk holds 2 MB
    with small_disk(tmp_path / "disk", "2m") as disk:
        proc = _prepare(tmp_path, "--data-url", str(corpus), cache=disk)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        said = " ".join(proc.stderr.split())
        assert said.startswith(f"error: cannot write the token cache in {disk / 'tokens'}: No space left on device")
        assert "MB" in said and "DEEPRNN_CACHE_DIR" in said and "Traceback" not in proc.stdout + proc.stderr
        assert said.count("error:") == 1
        assert [p.name for p in (disk / "tokens").iterdir() if not p.name.endswith(".lock")] == []
