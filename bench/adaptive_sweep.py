"""Adaptive search (Optuna TPE + ASHA pruning) against random search, side by side in one run.

Both run through the real sweep flow (Prefect's temporary server, a local Dask cluster, a fresh MLflow sqlite
store), over the same search space, the same number of trials, the same seeds, on the book's characters.
Trials are bounded by steps, not time, so the machine's load changes the wall times but not the results.

    python bench/adaptive_sweep.py --json bench/results/cpu-adaptive-sweep.json

The goal: the adaptive search's best validation perplexity within 1% of random search's, using at most 40%
of its training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DEEPRNN_TEST_DATA", REPO.parent / "shared" / "data")) / "timemachine.txt"

# A one-layer character LSTM on the whole book: learning rate (log scale) and width.
SPACE: dict[str, Any] = {
    "train.lr": {"low": 0.05, "high": 20.0, "log": True},
    "model.num_hiddens": [32, 64, 128],
}


def sections(data: str, max_steps: int, eval_every: int) -> dict[str, Any]:
    """What every trial of both searches shares: the book, a validation split, a step budget."""
    return {
        "data": {"url": data, "max_tokens": None, "val_fraction": 0.1, "test_fraction": 0.1},
        "model": {"num_layers": 1},
        "train": {
            "device": "cpu",
            "epochs": 10000,  # never reached: max_steps ends every trial
            "max_steps": max_steps,
            "eval_every_steps": eval_every,
            "eval_max_tokens": 5000,
            "final_eval_max_tokens": None,
        },
    }


def run_random(args: argparse.Namespace, runner: Any, folder: Path) -> dict[str, Any]:
    """Random search: ``--trials`` draws, every one trained to its step budget."""
    from deeprnn.flows.sweep_flow import sweep_lm

    started = time.perf_counter()
    summary = sweep_lm.with_options(task_runner=runner)(
        space=SPACE,
        preset="d2l-9.3",
        **sections(args.data, args.max_steps, args.eval_every),
        search="random",
        max_trials=args.trials,
        seed=args.seed,
        storage=str(folder / "studies.journal"),
        experiment="bench-random",
        register_best=False,
    )
    seconds = time.perf_counter() - started
    rows = [
        {
            "trial": t.index,
            "values": t.values,
            "status": t.status,
            "steps": int(t.metrics.get("steps", 0)),
            "val_perplexity": t.metrics.get("val_perplexity"),
        }
        for t in sorted(summary.trials, key=lambda t: t.index)
    ]
    return _table("random", rows, seconds)


def run_adaptive(args: argparse.Namespace, runner: Any, folder: Path) -> dict[str, Any]:
    """Optuna TPE with ASHA pruning: ``--trials`` trials, the ones falling behind stopped early."""
    from deeprnn.flows.sweep_flow import sweep_lm

    started = time.perf_counter()
    summary = sweep_lm.with_options(task_runner=runner)(
        space=SPACE,
        preset="d2l-9.3",
        **sections(args.data, args.max_steps, args.eval_every),
        search="optuna",
        max_trials=args.trials,
        pruner="asha",
        seed=args.seed,
        study="bench",
        storage=str(folder / "studies.journal"),
        experiment="bench-adaptive",
        register_best=False,
    )
    seconds = time.perf_counter() - started
    rows = [
        {
            "trial": t.index,
            "values": t.values,
            "status": t.status,
            "steps": int(t.metrics.get("steps", 0)),
            "val_perplexity": t.metrics.get("val_perplexity") if t.status == "FINISHED" else None,
            "last_val_perplexity": t.metrics.get("val_perplexity"),
        }
        for t in sorted(summary.trials, key=lambda t: t.index)
    ]
    return _table("optuna+asha", rows, seconds)


def _table(name: str, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    finished = [r["val_perplexity"] for r in rows if r["status"] == "FINISHED" and r["val_perplexity"] is not None]
    return {
        "search": name,
        "trials": len(rows),
        "pruned": sum(r["status"] == "PRUNED" for r in rows),
        "steps": sum(r["steps"] for r in rows),
        "best_val_perplexity": min(finished) if finished else None,
        "wall_seconds": round(seconds, 1),
        "rows": rows,
    }


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Both searches' trials, then the comparison, as markdown."""
    lines = []
    for result in results:
        lines += [
            f"### {result['search']}",
            "",
            "| trial | lr | hidden | status | steps | val ppl |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            ppl = r["val_perplexity"] if r["val_perplexity"] is not None else r.get("last_val_perplexity")
            shown = f"{ppl:.3f}" if ppl is not None else ""
            if r["status"] == "PRUNED" and ppl is not None:
                shown += " (at pruning)"
            lr, hidden = r["values"].get("train.lr"), r["values"].get("model.num_hiddens")
            lines.append(f"| {r['trial']} | {lr:.3g} | {hidden} | {r['status']} | {r['steps']:,} | {shown} |")
        lines.append("")
    random, adaptive = results
    lines += [
        "| search | trials | pruned | training steps | best val ppl | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        best = f"{r['best_val_perplexity']:.3f}" if r["best_val_perplexity"] is not None else "-"
        lines.append(
            f"| {r['search']} | {r['trials']} | {r['pruned']} | {r['steps']:,} | {best} | {r['wall_seconds']} |"
        )
    steps_ratio = adaptive["steps"] / random["steps"]
    gap = adaptive["best_val_perplexity"] / random["best_val_perplexity"] - 1
    met = steps_ratio <= 0.40 and gap <= 0.01
    lines += [
        "",
        f"Adaptive used {steps_ratio:.0%} of random search's training steps; its best validation perplexity is "
        f"{gap:+.2%} from random's. Goal (within 1%, at most 40% of the steps): {'met' if met else 'NOT met'}.",
        "",
        f"Command: `python bench/adaptive_sweep.py --trials {args.trials} --max-steps {args.max_steps} "
        f"--eval-every {args.eval_every} --seed {args.seed}`; {os.cpu_count()} CPU cores.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run both searches in a fresh environment and print (and optionally save) the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the corpus file (default: the book)")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=2400, help="each trial's step budget")
    parser.add_argument("--eval-every", type=int, default=120, help="steps between held-out evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="Dask workers (1: trials in a fixed order)")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--markdown", help="write the tables here")
    args = parser.parse_args()
    out_json, out_md = (Path(p).resolve() if p else None for p in (args.json, args.markdown))

    folder = Path(tempfile.mkdtemp(prefix="deeprnn-bench-sweep-"))
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["DEEPRNN_CACHE_DIR"] = str(folder / "cache")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.path.insert(0, str(REPO))
    from prefect.testing.utilities import prefect_test_harness

    from deeprnn.ops.cluster import dask_task_runner

    with prefect_test_harness(server_startup_timeout=120):
        results = [
            run_random(args, dask_task_runner(workers=args.workers, use_gpus=False), folder),
            run_adaptive(args, dask_task_runner(workers=args.workers, use_gpus=False), folder),
        ]
    text = markdown(results, args)
    print(text)
    if out_md:
        out_md.write_text(text + "\n")
    if out_json:
        out_json.write_text(json.dumps({"args": vars(args), "space": SPACE, "results": results}, indent=1))


if __name__ == "__main__":
    main()
