"""Training speed of deeprnn against the book's own code (D2L 9.3), side by side on one device.

Modes:

* ``compare`` (default): the book's program (d2l 0.17.6; ``bench/d2l_book.py``, or the shared
  ``d2l_reference.py`` with ``--d2l-impl reference``), deeprnn with the ``d2l-9.3`` preset and ``fast=True``,
  and deeprnn with ``fast=False`` (the eager loop). Each runs in its own subprocess, one after the other, so
  each has a fresh process and its own peak memory.
* ``batch-sweep``: deeprnn's fast path over ``--batch-sizes`` (learning rate unchanged, fixed epochs; a
  throughput measurement, not a quality one), on the whole training split by default so large batches fit,
  plus the book at batch 32 on the same tokens unless ``--skip-d2l``.
* ``kernels``: the CPU kernel question behind the fast path: the LSTM forward+backward, the whole training
  step and the forward alone, with oneDNN on and off, for each thread count in ``--kernel-threads``.

Prints markdown tables at the end; ``--json OUT`` keeps every number, the per-epoch histories, the device,
the torch version, the CPU count and the exact command line.

    python bench/train_speed.py --device cpu --epochs 5
    python bench/train_speed.py --device cpu --mode batch-sweep --epochs 2 --batch-sizes 32,128
    python bench/train_speed.py --device cpu --mode kernels
    python bench/train_speed.py --device cuda --json bench/cuda.json          # 500 epochs, the book's run
    python bench/train_speed.py --device cpu --skip-d2l --repeats 3 --against /tmp/old   # no-slowdown check

``--against PATH`` (compare mode) also runs the worker of another checkout of deeprnn (an earlier commit:
``git worktree add /tmp/old REF``) with its own code, interleaved with this one, and prints this code's
speed relative to it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the speed package beside this file
from speed.batch_sweep import mode_sweep  # noqa: E402
from speed.compare import mode_compare, render_against, render_history, render_samples, render_speed, worker_deeprnn  # noqa: E402
from speed.kernels import mode_kernels, render_kernels, worker_kernels  # noqa: E402
from speed.runner import DEFAULT_D2L_SCRIPT, DEFAULT_DATA, Runner, _cpu_name, _default_device, _log  # noqa: E402


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training speed: deeprnn vs the book's d2l code (D2L 9.3), side by side on one device.",
    )
    p.add_argument("--mode", choices=["compare", "batch-sweep", "kernels"], default="compare", help="default: compare")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--epochs", type=int, default=None, help="default: 5 on cpu, 500 (the book's) on cuda")
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding timemachine.txt, read in place (default: <repo>/../shared/data)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument(
        "--batch-sizes", type=_int_list, default=None, help="batch-sweep: default 32,128,512,2048; kernels: default 32"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="training tokens; 0 = the whole training split. Default: the book's 10000 in compare, "
        "the whole training split in batch-sweep",
    )
    p.add_argument("--skip-d2l", action="store_true", help="do not run the book's code")
    p.add_argument("--against", type=Path, default=None, help="compare: also time another deeprnn checkout's fast path")
    p.add_argument(
        "--repeats", type=int, default=1, help="run every program this many times (interleaved); tables show medians"
    )
    p.add_argument(
        "--d2l-impl",
        choices=["book", "reference"],
        default="book",
        help="book: bench/d2l_book.py (per-epoch history, held-out ppl); reference: the shared "
        "d2l_reference.py (final line only)",
    )
    p.add_argument(
        "--d2l-script",
        type=Path,
        default=DEFAULT_D2L_SCRIPT,
        help="the shared reference script (default: <repo>/../shared/bench/d2l_reference.py)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every program (torch.set_num_threads and OMP/MKL_NUM_THREADS)",
    )
    p.add_argument("--kernel-threads", type=_int_list, default=None, help="kernels: default 1,<cpu count>")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="deeprnn's train.precision (default: the preset's, auto = bf16 autocast on CUDA); "
        "fp32 compares like for like with the book",
    )
    p.add_argument(
        "--target-ppl",
        type=float,
        default=1.05,
        help="report the time to reach this training perplexity (default: 1.05)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each subprocess (default: 3600)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="on a shared machine: wait up to this many seconds before each run for the other load "
        "to drop below --max-other-load (default: 0, no waiting)",
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.1,
        help="share of the machine's CPU used by other processes above which a run counts as "
        "disturbed (with --quiet-wait: waited out before, and the run retried up to twice; default: 0.1)",
    )
    # internal: one program in a fresh process, printing one JSON line
    p.add_argument("--_worker", choices=["deeprnn", "kernels"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--fast", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device is None:
        a.device = _default_device()
    if a.epochs is None:
        a.epochs = 500 if a.device == "cuda" else 5
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return a


def environment(a: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *argv]),
        "argv": argv,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_name": _cpu_name(),
        "torch_default_threads": torch.get_num_threads(),
        "threads": a.threads,
        "mode": a.mode,
        "device": a.device,
        "epochs": a.epochs,
        "repeats": a.repeats,
        "data": str(a.data.resolve()),
        "d2l_impl": a.d2l_impl,
        "precision": a.precision or "preset",
        "target_ppl": a.target_ppl,
    }
    try:
        import d2l  # noqa: F401

        env["d2l"] = getattr(d2l, "__version__", "?")
    except Exception:
        env["d2l"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    a = parse_args(argv[1:])
    if a._worker:
        fn = worker_deeprnn if a._worker == "deeprnn" else worker_kernels
        print(json.dumps(fn(a)))
        return 0
    if not (a.data / "timemachine.txt").is_file():
        _log(f"no timemachine.txt in {a.data}; pass --data DIR")
        return 2
    if a.mode != "kernels" and not a.skip_d2l and a.d2l_impl == "reference" and not a.d2l_script.is_file():
        _log(f"no d2l reference script at {a.d2l_script}; pass --d2l-script, --d2l-impl book or --skip-d2l")
        return 2
    env = environment(a, [str(Path(argv[0])), *argv[1:]])
    runner = Runner(a)
    t0 = time.perf_counter()
    if a.mode == "compare":
        result = mode_compare(a, runner)
    elif a.mode == "batch-sweep":
        result = mode_sweep(a, runner)
    else:
        result = mode_kernels(a, runner)
    env["total_s"] = time.perf_counter() - t0
    device_names = [r.get("device_name") for r in result.get("rows", result.get("threads", {})).values()]
    env["device_name"] = next((d for d in device_names if d), _cpu_name() if a.device == "cpu" else None)

    title = (
        f"## {a.mode} on {a.device} ({env['device_name']}), torch {env['torch']}, {env['cpu_count']} CPUs, "
        f"threads {a.threads or env['torch_default_threads']}"
    )
    parts = [title]
    if a.mode == "kernels":
        parts.append(render_kernels(result))
    else:
        parts.append(f"{a.epochs} epochs, {result['max_tokens'] or 'all'} training tokens, repeats {a.repeats}")
        parts.append(render_speed(result, a, batch_col=a.mode == "batch-sweep"))
        against = render_against(result, a) if a.mode == "compare" else ""
        if against:
            parts += ["Against the other checkout (>1: this code is faster)", against]
        hist = render_history(result)
        if hist and a.mode == "compare":
            parts += ["Training perplexity by epoch", hist]
        samples = render_samples(result)
        if samples and a.mode == "compare":
            parts += ["Greedy samples (50 characters)", samples]
    parts.append(f"`{env['command']}`")
    print("\n\n".join(parts))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"env": env, **result}, indent=1, default=str))
        _log(f"wrote {a.json}")
    failed = [n for n, r in result.get("rows", result.get("threads", {})).items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
