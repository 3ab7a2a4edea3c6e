"""``--mode batch-sweep``: deeprnn's fast path over ``--batch-sizes`` on the same tokens, and the book at 32."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from speed.format import _one_line
from speed.runner import BOOK, FAST, Runner, _log, _ratios, _rotated, _summarize, _train_split_size


def mode_sweep(a: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    sizes = a.batch_sizes or [32, 128, 512, 2048]
    max_tokens = a.max_tokens if a.max_tokens is not None else 0
    tokens = max_tokens if max_tokens > 0 else _train_split_size(a.data)
    programs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if not a.skip_d2l:
        programs.append((f"{BOOK}, batch 32", lambda: runner.book(32, tokens)))
    for b in sizes:
        programs.append((f"{FAST}, batch {b}", lambda b=b: runner.deeprnn(True, batch_size=b, max_tokens=tokens)))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in programs}
    for rep in range(a.repeats):
        for name, fn in _rotated(programs, rep):
            _log(f"[{rep + 1}/{a.repeats}] {name}: {a.epochs} epochs, {tokens} training tokens on {a.device} ...")
            r = fn()
            runs[name].append(r)
            _log(f"    {_one_line(r)}")
    rows = {name: _summarize(rs) for name, rs in runs.items()}
    base = rows.get(f"{BOOK}, batch 32")
    for name, row in rows.items():
        if not name.startswith(BOOK):
            row["vs_book"] = _ratios(row, base)
    return {"rows": rows, "runs": runs, "max_tokens": tokens}
