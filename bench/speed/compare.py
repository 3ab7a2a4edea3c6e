"""``--mode compare``: the book's program against deeprnn (fast and eager, and optionally another checkout),
the deeprnn worker each deeprnn row runs in, and the tables of speed, histories, samples and the other checkout."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

from speed.format import _mem, _num, _one_line, _pct, _ppl, _sec, _spread, _table, _x
from speed.runner import (
    AGAINST,
    BOOK,
    BOOK_MAX_TOKENS,
    EAGER,
    FAST,
    Runner,
    _device_name,
    _import_repo,
    _log,
    _ratios,
    _rotated,
    _sha1,
    _summarize,
    _train_split_size,
)


def worker_deeprnn(a: argparse.Namespace) -> dict[str, Any]:
    """deeprnn with the book's preset, built exactly as the pipeline builds it (deeprnn.pipeline)."""
    _import_repo()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from deeprnn.config import preset_config
    from deeprnn.generate import generate
    from deeprnn.pipeline import build_trainer, load_data
    from deeprnn.training.progress import EpochStats

    train: dict[str, Any] = {"epochs": a.epochs, "device": a.device, "fast": bool(a.fast)}
    if a.batch_size:
        train["batch_size"] = a.batch_size
    if a.precision:
        train["precision"] = a.precision
    overrides: dict[str, Any] = {"train": train, "data": {"url": str(Path(a.data) / "timemachine.txt")}}
    if a.max_tokens is not None:
        overrides["data"]["max_tokens"] = a.max_tokens
    cfg = preset_config("d2l-9.3", overrides)

    # The stages as the pipeline's tasks run them (deeprnn.pipeline).
    data = load_data(cfg)
    vocab, splits = data.vocab, data.splits
    trainer = build_trainer(cfg, len(vocab), splits)
    model, device = trainer.model, trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    history: list[EpochStats] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = trainer.fit(on_epoch=history.append)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    train_cpu_s = time.process_time() - cpu0

    samples = {p: generate(model, vocab, p, cfg.sample.num_tokens, token=cfg.data.token) for p in cfg.sample.prefixes}
    hist = [
        {
            "epoch": h.epoch,
            "train_perplexity": h.train_perplexity,
            "seconds": h.seconds,
            "tokens": int(round(h.tokens_per_sec * h.seconds)),
            "tokens_per_sec": h.tokens_per_sec,
            "heldout_perplexity": h.heldout_perplexity,
        }
        for h in history
    ]
    tokens_total = sum(h["tokens"] for h in hist)
    out: dict[str, Any] = {
        "impl": "deeprnn",
        "fast": bool(a.fast),
        "step_mode": result.step_mode,
        "precision": getattr(result, "precision", "fp32"),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "epochs": result.epochs_done,
        "batch_size": cfg.train.batch_size,
        "num_steps": cfg.train.num_steps,
        "max_tokens": cfg.data.max_tokens,
        "train_tokens_available": int(splits.train.numel()),
        "vocab_size": len(vocab),
        "vocab_sha1": _sha1("\n".join(vocab.idx_to_token)),
        "tokens_total": tokens_total,
        "tokens_per_epoch": tokens_total / max(1, len(hist)),
        "train_wall_s": wall,
        "train_cpu_s": train_cpu_s,  # all threads; robust to other load when --threads 1
        "fit_train_seconds": result.train_seconds,
        "epoch_seconds_total": sum(h["seconds"] for h in hist),
        "tokens_per_s": result.tokens_per_sec,  # FitResult: tokens / summed epoch times
        "overall_tokens_per_s": tokens_total / wall if wall > 0 else 0.0,
        "final_train_perplexity": result.final_train_perplexity,
        "heldout_perplexity": hist[-1]["heldout_perplexity"] if hist else None,
        "best_heldout_perplexity": result.best_heldout_perplexity,
        "samples": samples,
        "history": hist,
    }
    if device.type == "cuda":
        out["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_mem_kind"] = "cuda_max_allocated"
    return out


def mode_compare(a: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    max_tokens = a.max_tokens if a.max_tokens is not None else BOOK_MAX_TOKENS
    book_tokens = max_tokens if max_tokens > 0 else _train_split_size(a.data)
    programs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if not a.skip_d2l:
        programs.append((BOOK, lambda: runner.book(32, book_tokens)))
    programs.append((FAST, lambda: runner.deeprnn(True, max_tokens=max_tokens)))
    programs.append((EAGER, lambda: runner.deeprnn(False, max_tokens=max_tokens)))
    if a.against:
        programs.append((AGAINST, lambda: runner.deeprnn(True, max_tokens=max_tokens, checkout=a.against)))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in programs}
    for rep in range(a.repeats):
        for name, fn in _rotated(programs, rep):
            _log(f"[{rep + 1}/{a.repeats}] {name}: {a.epochs} epochs on {a.device} ...")
            r = fn()
            runs[name].append(r)
            _log(f"    {_one_line(r)}")
    rows = {name: _summarize(rs) for name, rs in runs.items()}
    base = rows.get(BOOK)
    for name, row in rows.items():
        if name != BOOK:
            row["vs_book"] = _ratios(row, base)
    if AGAINST in rows:
        rows[FAST]["vs_against"] = _ratios(rows[FAST], rows[AGAINST])
    return {"rows": rows, "runs": runs, "max_tokens": max_tokens}


def render_speed(result: dict[str, Any], a: argparse.Namespace, batch_col: bool = False) -> str:
    header = (
        ["program", "step"]
        + (["batch", "batches/epoch"] if batch_col else [])
        + [
            "tok/s (epochs)",
            "tok/s (steady)",
            "tok/s (overall)",
            "train wall",
            "x book tok/s",
            "x book wall",
            f"t to ppl<={a.target_ppl:g}",
            "final train ppl",
            "held-out ppl",
            "peak mem",
            "tok/CPU-s",
            "other load",
        ]
    )
    rows = []
    for name, r in result["rows"].items():
        if "error" in r:
            rows.append([name, ""] + (["", ""] if batch_col else []) + [f"FAILED: {r['error']}"] + [""] * 11)
            continue
        vs = r.get("vs_book") or {}
        target = (
            "-" if r.get("time_to_target_s") is None else f"{r['time_to_target_s']:.1f} s (ep {r.get('target_epoch')})"
        )
        if r.get("history") is None:
            target = "n/a"
        step = f"{r['step_mode']}, {r.get('precision', 'fp32')}" if r.get("step_mode") else "eager, fp32"
        cols = [name, step]
        if batch_col:
            per_batch = r["batch_size"] * r.get("num_steps", 35)
            cols += [
                str(r["batch_size"]),
                f"{r['tokens_per_epoch'] / per_batch:.0f}" if r.get("tokens_per_epoch") else "-",
            ]
        cols += [
            _num(r.get("tokens_per_s")) + _spread(r, "tokens_per_s"),
            _num(r.get("steady_tokens_per_s")),
            _num(r.get("overall_tokens_per_s")) + _spread(r, "overall_tokens_per_s"),
            _sec(r.get("train_wall_s")),
            _x(vs.get("tokens_per_s_x")) if vs else ("1.00x" if name.startswith(BOOK) else "-"),
            _x(vs.get("wall_x")) if vs else ("1.00x" if name.startswith(BOOK) else "-"),
            target,
            _ppl(r.get("final_train_perplexity")),
            _ppl(r.get("heldout_perplexity")),
            _mem(r),
            _num(r.get("tokens_per_cpu_s")),
            _pct(r.get("other_load")),
        ]
        rows.append(cols)
    return _table(header, rows)


def render_history(result: dict[str, Any]) -> str:
    """Training perplexity at a few epochs, per program: the runs should track each other."""
    named = {n: r["history"] for n, r in result["rows"].items() if r.get("history")}
    if not named:
        return ""
    epochs = max(len(h) for h in named.values())
    picks = sorted({e for e in (1, 2, 3, 5, 10, 20, 50, 100, 200, 300, 400, 500, epochs) if e <= epochs})
    rows = []
    for e in picks:
        row = [str(e)]
        for hist in named.values():
            h = next((x for x in hist if x["epoch"] == e), None)
            row.append(_ppl(h["train_perplexity"]) if h else "-")
        rows.append(row)
    return _table(["epoch"] + [f"{n} ppl" for n in named], rows)


def render_against(result: dict[str, Any], a: argparse.Namespace) -> str:
    """This checkout's fast path relative to the ``--against`` checkout's, measured in the same run."""
    fast, other = result["rows"].get(FAST, {}), result["rows"].get(AGAINST)
    vs = fast.get("vs_against")
    if other is None or not vs:
        return ""
    same = [h["train_perplexity"] for h in fast.get("history", [])] == [
        h["train_perplexity"] for h in other.get("history", [])
    ]
    header = ["this vs " + str(a.against), "tok/s (epochs)", "tok/s (overall)", "train wall", "same perplexities"]
    row = [
        FAST,
        _x(vs.get("tokens_per_s_x")),
        _x(vs.get("overall_tokens_per_s_x")),
        _x(vs.get("wall_x")),
        "yes" if same else "NO",
    ]
    return _table(header, [row])


def render_samples(result: dict[str, Any]) -> str:
    lines = []
    for name, r in result["rows"].items():
        for prefix, text in (r.get("samples") or {}).items():
            lines.append(f"- {name}, '{prefix}': `{text}`")
    return "\n".join(lines)
