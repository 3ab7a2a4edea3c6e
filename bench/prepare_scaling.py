"""How data preparation scales: ``deeprnn prepare`` on corpora of about 4 MB to 1 GB, against the code before
the prepared token cache, side by side in one run.

    python bench/prepare_scaling.py [--sizes 4,40,220,400,1000] [--before-sizes 4,40,220] [--text FILE]

Each corpus is built from a text we have (the book, ``--text`` or ``../shared/data/timemachine.txt``),
repeated to the size. Every measurement is a process of its own, timed end to end with its peak resident
memory (``wait4``):

* ``deeprnn prepare`` with an empty token cache (tokenizes), then the same command again (served from the
  cache), with the book's normalization (``d2l``) and with every character kept (``none``);
* the code before the change, checked out with ``git worktree`` (``--before REV``, default: the parent of the
  commit that added ``deeprnn/data/prepare.py``), running what its ``build-vocab`` and ``prepare-splits`` tasks ran:
  read and tokenize the corpus twice with Python lists, build the vocabulary, encode to a tensor. It is only
  run up to ``--before-sizes``: at 31x the file in memory, 1 GB does not fit in this machine's 24 GB.

Prints one table and writes the figures as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT.parent / "shared" / "data" / "timemachine.txt"

# The previous pipeline's data stages (tasks/data.py build_vocab + prepare_splits), as the library ran them.
BEFORE = """
import sys, torch
from deeprnn.data import book_tokenize as tokenize
from deeprnn.data.vocab import Vocab
path = sys.argv[1]
lines = lambda: tokenize.preprocess_lines(open(path, encoding="utf-8").read())
tokens = tokenize.flatten(tokenize.tokenize(lines(), "char"))  # build-vocab
vocab = Vocab(tokens)
tokens = tokenize.flatten(tokenize.tokenize(lines(), "char"))  # prepare-splits, again
ids = torch.tensor(vocab.encode(tokens), dtype=torch.long)
print(len(vocab), ids.numel())
"""


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, str]:
    """Run ``cmd``; return wall seconds, peak RSS in MB and its stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, out  # ru_maxrss is in KB on Linux


def build_corpus(text: bytes, megabytes: int, folder: Path) -> Path:
    """``text`` repeated to about ``megabytes`` MB."""
    path = folder / f"corpus-{megabytes}mb.txt"
    copies = max(1, round(megabytes * 1e6 / len(text)))
    with open(path, "wb") as fh:
        for _ in range(copies):
            fh.write(text)
    return path


def before_revision() -> str:
    """The parent of the commit that added the prepared token cache."""
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "deeprnn/data/prepare.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not added:
        raise SystemExit("cannot find the commit that added deeprnn/data/prepare.py; give --before REV")
    return added[-1] + "^"


def main() -> None:
    """Build the corpora, measure every variant, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,40,220,400,1000", help="corpus sizes in MB")
    parser.add_argument("--before-sizes", default="4,40,220", help="sizes also run with the code before the change")
    parser.add_argument("--text", type=Path, default=BOOK, help="text to repeat (default: the book)")
    parser.add_argument("--before", default=None, help="git revision of the code before the change")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    before_sizes = {int(s) for s in args.before_sizes.split(",") if s}
    text = args.text.read_bytes()

    work = Path(tempfile.mkdtemp(prefix="deeprnn-prepare-bench-"))
    before_tree = work / "before"
    rows: list[dict[str, object]] = []
    try:
        if before_sizes:
            rev = args.before or before_revision()
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before_tree), rev], cwd=ROOT, check=True)
        for mb in sizes:
            corpus = build_corpus(text, mb, work)
            row: dict[str, object] = {"mb": mb, "bytes": corpus.stat().st_size}
            for normalize in ("d2l", "none"):
                env = {**os.environ, "DEEPRNN_CACHE_DIR": str(work / f"cache-{mb}-{normalize}")}
                cmd = [
                    sys.executable,
                    "-m",
                    "deeprnn.cli.app",
                    "prepare",
                    "--data-url",
                    str(corpus),
                    "--normalize",
                    normalize,
                ]
                for phase in ("cold", "cached"):
                    seconds, rss, out = measure(cmd, env, ROOT)
                    if phase == "cached" and "served from the cache" not in out:
                        raise RuntimeError(f"the second prepare of {corpus} was not served from the cache:\n{out}")
                    row[f"{normalize}_{phase}_s"], row[f"{normalize}_{phase}_mb"] = round(seconds, 2), round(rss)
            if mb in before_sizes:
                env = {**os.environ, "PYTHONPATH": str(before_tree)}
                seconds, rss, _ = measure([sys.executable, "-c", BEFORE, str(corpus)], env, before_tree)
                row["before_s"], row["before_mb"] = round(seconds, 2), round(rss)
            corpus.unlink()
            shutil.rmtree(work / f"cache-{mb}-d2l", ignore_errors=True)
            shutil.rmtree(work / f"cache-{mb}-none", ignore_errors=True)
            rows.append(row)
            print_table(rows)
    finally:
        if before_tree.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(before_tree)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=1) + "\n")


def print_table(rows: list[dict[str, object]]) -> None:
    """The figures so far as a markdown table: seconds and peak MB per variant, and the speed-up."""
    head = (
        "| corpus | before: s / peak MB | d2l: s / peak MB | d2l, cached | none: s / peak MB | none, cached "
        "| d2l speed-up | memory ratio |"
    )
    print("\n" + head + "\n" + "|" + " --- |" * 8)
    for r in rows:
        before = f"{r['before_s']} / {r['before_mb']}" if "before_s" in r else "not run"
        speed = f"{float(r['before_s']) / float(r['d2l_cold_s']):.1f}x" if "before_s" in r else ""
        memory = f"{float(r['before_mb']) / float(r['d2l_cold_mb']):.1f}x less" if "before_s" in r else ""
        print(
            f"| {int(r['bytes']) / 1e6:,.0f} MB | {before} | {r['d2l_cold_s']} / {r['d2l_cold_mb']} "
            f"| {r['d2l_cached_s']} / {r['d2l_cached_mb']} | {r['none_cold_s']} / {r['none_cold_mb']} "
            f"| {r['none_cached_s']} / {r['none_cached_mb']} | {speed} | {memory} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
