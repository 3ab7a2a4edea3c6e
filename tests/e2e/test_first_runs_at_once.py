"""Several first runs at once on a fresh machine: `deeprnn run` in four terminals opened together, with no
Prefect API configured and a PREFECT_HOME that has no database yet. Each command starts Prefect's
temporary API server on the same new database; every run must complete, with no traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _fresh_machine(root: Path) -> dict[str, str]:
    """A user's first morning: a new PREFECT_HOME, no API configured, a new MLflow store and corpus cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DEEPRNN_CACHE_DIR=str(root / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def _tiny_run(book_url: str) -> list[str]:
    """The smallest whole run: one epoch of the smoke preset on the CPU, a few characters generated."""
    return [
        *("run", "--preset", "smoke", "--epochs", "1", "--device", "cpu"),
        *("--test-fraction", "0.02", "--num-tokens", "10", "--data-url", book_url, "--data-sha1", BOOK_SHA1),
    ]


COUNT = 4  # each command races the others to create the database and start a server on it


def test_first_runs_started_together_on_a_fresh_prefect_home_all_complete(tmp_path: Path, book_url: str) -> None:
    count = COUNT
    env = _fresh_machine(tmp_path)
    logs = [tmp_path / f"run-{i}.log" for i in range(count)]
    started = time.monotonic()
    procs = []
    for log in logs:  # within a second, as terminals opened together
        with open(log, "w", encoding="utf-8") as out:
            command = [sys.executable, "-m", "deeprnn.cli.app", *_tiny_run(book_url)]
            procs.append(subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))
        time.sleep(0.2)
    try:
        codes = [proc.wait(timeout=540) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    seconds = time.monotonic() - started
    printed = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
    for code, out in zip(codes, printed):
        assert code == 0, out[-5000:]
        assert "Traceback" not in out and "OperationalError" not in out and "error:" not in out, out[-5000:]
    # Every flow run is in the one database under PREFECT_HOME, completed.
    with sqlite3.connect(tmp_path / "prefect-home" / "prefect.db") as db:
        states = [row[0] for row in db.execute("SELECT state_type FROM flow_run")]
    assert states == ["COMPLETED"] * count
    print(f"{count} first runs at once: all complete in {seconds:.0f} s")
