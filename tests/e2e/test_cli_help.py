"""What the commands print at 80 columns to a pipe (a CI log, ``| less``): every option name whole, its
description readable beside or below it, the defaults shown, and no word (a URL, a path) broken or cut."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from deeprnn.cli.app import app
from deeprnn.cli.options import OPTION_FIELDS

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
COMMANDS = ["run", "prepare", "generate", "presets", "sweep", "setup-server"]


def _help(*args: str) -> str:
    """``deeprnn ARGS --help`` as a pipe receives it at 80 columns."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "deeprnn.cli.app", *args, "--help"], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return proc.stdout


def _option_rows(text: str) -> dict[str, str]:
    """Option -> its help text (the lines below it joined), from a command's help."""
    rows: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        found = re.match(r"^  (--[a-z0-9-]+)", line)
        if found:
            current = found.group(1)
            rows[current] = line[len(found.group(0)) :]
        elif current and line.startswith("    "):
            rows[current] += " " + line.strip()
        else:
            current = None
    return {name: " ".join(text.split()) for name, text in rows.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_keeps_every_option_whole_and_every_line_within_80(command: str) -> None:
    text = _help(command)
    assert "\u2026" not in text  # nothing cut off
    for line in text.splitlines():  # longer only where one word is longer than the room for it
        assert len(line) <= 80 or " " not in line.strip(), line
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    rows = _option_rows(text)
    for param in (p for p in click_command.params if not getattr(p, "hidden", False)):  # aliases kept for scripts
        for opt in (o for o in param.opts if o.startswith("--")):
            assert opt in rows or f"  {opt} " in text or f"/{opt}" in text, f"{opt} missing or cut in {command} help"


def test_every_configuration_option_shows_its_default() -> None:
    rows = _option_rows(_help("run"))
    for cli_name in OPTION_FIELDS:
        flag = "--" + cli_name.replace("_", "-")
        assert "[default:" in rows[flag], f"{flag}: {rows[flag]}"
    assert "[default: the preset's; d2l-9.3: 35, text: 64]" in rows["--num-steps"]  # the own-text preset's too
    assert "[default: the preset's; d2l-9.3: 500, text: 1000]" in rows["--epochs"]
    assert "[default: the preset's; d2l-9.3: 2.0]" in rows["--lr"].replace(", text: 0.003", "")
    assert "[default: the preset's; d2l-9.3: time traveller, traveller, text: none]" in rows["--prefix"]
    assert "d2l-9.3: unset, text: 300.0]" in rows["--time-budget"]
    assert "--checkpoint-every-steps" in rows and "Empty: per epoch only." in rows["--checkpoint-every-steps"]


def test_the_command_list_says_what_each_command_does_in_full() -> None:
    text = _help()
    listed = dict(re.findall(r"^  ([a-z][a-z-]*)\s{2,}(.+)$", text, re.MULTILINE))
    assert sorted(listed) == sorted(COMMANDS)
    assert not any(summary.endswith("...") for summary in listed.values()), listed
    assert listed["run"] == "Train, evaluate and log a model (the training flow)."


def test_the_former_option_num_chars_is_hidden_and_stands_for_num_tokens() -> None:
    from deeprnn.cli.options import overrides

    assert "--num-tokens" in _help("run") and "--num-chars" not in _help("run")
    assert overrides({"num_chars": 5}) == {"sample": {"num_tokens": 5}}
    assert overrides({"num_tokens": 6, "num_chars": 5}) == {"sample": {"num_tokens": 6}}  # the name now wins
    click_command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    assert any(p.opts == ["--num-chars"] and p.hidden for p in click_command.params)
