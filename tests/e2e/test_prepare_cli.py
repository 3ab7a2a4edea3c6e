"""``deeprnn prepare`` as a user runs it: what it prints, the cache it fills, and one clear message (no
traceback, nothing half-written) for each input it cannot use."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ENGLISH = "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite matter.\n"


def _prepare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DEEPRNN_CACHE_DIR": str(tmp_path / "cache"),
        "COLUMNS": "80",
    }  # a narrow log: the paths must still be whole
    return subprocess.run(
        [sys.executable, "-m", "cli.app", "prepare", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_prepare_prints_the_entry_and_a_second_run_is_served_from_the_cache(tmp_path: Path) -> None:
    corpus = tmp_path / "english.txt"
    corpus.write_text(ENGLISH * 2000, encoding="utf-8")
    args = ("--data-url", str(corpus), "--normalize", "none", "--val-fraction", "0.1", "--json")
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
    proc = _prepare(tmp_path, "--data-url", str(corpus))
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
    proc = _prepare(tmp_path, "--data-url", str(source), *extra)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in " ".join(proc.stderr.split())
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stdout + proc.stderr
    tokens = tmp_path / "cache" / "tokens"
    assert not tokens.exists() or not [p for p in tokens.iterdir() if not p.name.endswith(".lock")]
