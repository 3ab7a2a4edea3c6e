"""The documentation's "Using the library from Python" page runs as written: its code blocks, in order, in one
namespace, in a fresh folder holding ``my.txt`` (a slice of the test corpus), so the page cannot drift from
the library."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from corpora import CorpusFile

PAGE = Path(__file__).resolve().parents[2] / "docs" / "python.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(markdown: str) -> list[str]:
    """The ```python fenced blocks of a markdown text, in order."""
    return _BLOCK.findall(markdown)


def test_the_page_has_the_examples_it_promises() -> None:
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    assert len(blocks) == 2
    for name in ("load_data", "start_training", "evaluate_splits", "generate("):
        assert name in blocks[0]
    assert "size_to_text" in blocks[1]


def test_the_python_page_runs_as_written(
    corpus_file: CorpusFile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Smoke-sized: 40,000 characters of the corpus keep training, sizing and generation to seconds.
    (tmp_path / "my.txt").write_text(corpus_file.path.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(tmp_path / "cache"))
    namespace: dict[str, object] = {"__name__": "docs_python_page"}
    for block in python_blocks(PAGE.read_text(encoding="utf-8")):
        exec(compile(block, str(PAGE), "exec"), namespace)
    out = capsys.readouterr().out

    assert re.search(r"^[\d,]+ training tokens, vocabulary of \d+$", out, re.MULTILINE)
    assert re.search(r"^epoch 3: train ppl [\d.]+$", out, re.MULTILINE)  # the smoke preset's 3 epochs
    assert re.search(r"^validation [\d.]+, test [\d.]+$", out, re.MULTILINE)
    assert re.search(r"^model sized to the text: 2 x \d+ lstm", out, re.MULTILINE)
    assert re.search(r"^time_budget after \d+ steps; best weights from step \d+$", out, re.MULTILINE) or re.search(
        r"^early_stopping after", out, re.MULTILINE
    )
    assert (tmp_path / "runs" / "example" / "model.pt").is_file()
    assert (tmp_path / "runs" / "text-example" / "model.pt").is_file()
    sized = namespace["config"]
    prefixes = sized.sample.prefixes  # type: ignore[attr-defined]
    # Each drawn prefix is in the note that names it and again in its continuation.
    assert prefixes and all(out.count(p) >= 2 for p in prefixes)
