"""Peak memory of ``deeprnn prepare`` on text without line breaks beside the same text with them, in one run.

    python bench/prepare_memory.py [--mb 300] [--text FILE] [--gzip] [--before REV] [--out FILE.md]

The corpus is a real text repeated to ``--mb`` MB: the book (``$DEEPRNN_TEST_DATA/timemachine.txt``, else
``../shared/data/timemachine.txt``) unless ``--text`` names another. It is written twice, byte for byte the
same size: as it is (lines of about 70 characters), and with every line break replaced by a space (one line
of 300 MB, like minified JSON or a novel without line breaks). ``--gzip`` adds the one-line text compressed.

Every measurement is ``deeprnn prepare`` in a process of its own with an empty token cache, timed end to end,
its peak resident memory read with ``wait4`` (``ru_maxrss``), for the book's rule (``d2l``) and for every
character kept (``none``). ``--before REV`` runs the same commands with the code of another git revision
(checked out with ``git worktree``) beside this one. Prints one markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_text() -> Path:
    """The book: in ``$DEEPRNN_TEST_DATA`` when set, else beside the checkout."""
    data = os.environ.get("DEEPRNN_TEST_DATA")
    return (Path(data) if data else ROOT.parent / "shared" / "data") / "timemachine.txt"


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Run ``cmd``; return its wall seconds and peak RSS in MB."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KB on Linux


def build_corpora(text: bytes, megabytes: int, folder: Path, with_gzip: bool) -> dict[str, Path]:
    """``text`` repeated to about ``megabytes`` MB, with its line breaks and without (the same size)."""
    one_line = text.replace(b"\r", b" ").replace(b"\n", b" ")
    copies = max(1, round(megabytes * 1e6 / len(text)))
    corpora = {"with line breaks": folder / "lines.txt", "one line": folder / "one-line.txt"}
    for path, block in ((corpora["with line breaks"], text), (corpora["one line"], one_line)):
        with open(path, "wb") as fh:
            for _ in range(copies):
                fh.write(block)
    if with_gzip:
        corpora["one line, .gz"] = folder / "one-line.txt.gz"
        with open(corpora["one line"], "rb") as src, gzip.open(corpora["one line, .gz"], "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    return corpora


def main() -> None:
    """Build the corpora, prepare each in its own process, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="corpus size in MB")
    parser.add_argument("--text", type=Path, default=None, help="text to repeat (default: the book)")
    parser.add_argument("--gzip", action="store_true", help="also the one-line text as a .gz file")
    parser.add_argument("--before", default=None, help="also run the code of this git revision")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    args = parser.parse_args()
    source = args.text or default_text()
    work = Path(tempfile.mkdtemp(prefix="deeprnn-prepare-memory-"))
    trees = {"this code": ROOT}
    rows: list[list[str]] = []
    try:
        if args.before:
            trees[f"before ({args.before})"] = work / "before"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(work / "before"), args.before], cwd=ROOT)
        corpora = build_corpora(source.read_bytes(), args.mb, work, args.gzip)
        for name, corpus in corpora.items():
            for normalize in ("d2l", "none"):
                row = [name, f"{corpus.stat().st_size / 1e6:,.0f} MB", normalize]
                for label, tree in trees.items():
                    cache = work / "cache"
                    env = {**os.environ, "DEEPRNN_CACHE_DIR": str(cache), "PYTHONPATH": str(tree)}
                    cmd = [sys.executable, "-m", "deeprnn.cli.app", "prepare", "--data-url", str(corpus)]
                    seconds, rss = measure([*cmd, "--normalize", normalize], env, tree)
                    shutil.rmtree(cache, ignore_errors=True)
                    row.append(f"{seconds:.1f} s, {rss / 1024:.2f} GB")
                    print(f"{name} / {normalize} / {label}: {seconds:.1f} s, peak RSS {rss:,.0f} MB", flush=True)
                rows.append(row)
    finally:
        if args.before:
            subprocess.run(["git", "worktree", "remove", "--force", str(work / "before")], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    table = render(rows, list(trees), source.name)
    print("\n" + table)
    if args.out:
        args.out.write_text(table)


def render(rows: list[list[str]], labels: list[str], source: str) -> str:
    """The markdown table: one row per corpus and normalization, seconds and peak RSS per code version."""
    head = ["text", "size", "normalize", *(f"{label}: time, peak RSS" for label in labels)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = f"\n`deeprnn prepare`, empty token cache, one process each; the text is {source} repeated.\n"
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    main()
