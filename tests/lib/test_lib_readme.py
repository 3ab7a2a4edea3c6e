"""The README stays a page of one or two screens whose links all lead somewhere: the documentation site's
pages (checked further by ``mkdocs build --strict``), the project's files and its images."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# [text](target) and ![alt](target), without a scheme (http links are not checked here).
_LOCAL_LINK = re.compile(r"!?\[[^\]]*\]\((?![a-z]+://)([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_one_or_two_screens() -> None:
    assert len(README.splitlines()) <= 250


def test_readme_links_lead_to_files_that_exist() -> None:
    targets = _LOCAL_LINK.findall(README)
    assert "docs/own-text.md" in targets and any(t.endswith(".png") for t in targets)
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_keeps_the_two_commands() -> None:
    assert "pip install -c constraints.txt -e . && deeprnn run" in README
    assert "bash scripts/test.sh" in README and 'bash scripts/test.sh -m "not e2e"' in README
