"""Compare candidate settings for the ``full-book`` preset: validation picks the epoch, test is reported.

Each candidate is a set of overrides on top of ``full-book``; candidates run as parallel subprocesses on
one device (``--parallel``), so the wall times in one table are comparable with each other only.

    python bench/tune_full_book.py --device cuda --parallel 4
    python bench/tune_full_book.py --device cpu --candidates '[{"train": {"epochs": 1}}]'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "timemachine.txt"

# The next round, around the preset as it stands (earlier rounds: bench/results/h200-full-book-*.json).
CANDIDATES: list[dict] = [
    {},  # the preset as it stands
    {"train": {"epochs": 40}},
    {"model": {"dropout": 0.4}, "train": {"epochs": 30}},
    {"model": {"num_hiddens": 768}, "train": {"epochs": 30}},
    {"train": {"epochs": 40, "weight_decay": 0.1}},
    {"train": {"num_steps": 256, "epochs": 40}},
]


def trial(data: str, device: str, overrides: dict) -> dict:
    """Train one candidate in this process and return its figures."""

    from deeprnn.config import preset_config
    from deeprnn.evaluate import perplexity
    from deeprnn.pipeline import build_trainer, load_data

    settings = {
        **overrides,
        "data": {**overrides.get("data", {}), "url": str(data)},
        "train": {**overrides.get("train", {}), "device": device},
    }
    cfg = preset_config("full-book", settings)
    loaded = load_data(cfg)  # the stages as the pipeline's tasks run them
    splits = loaded.splits
    trainer = build_trainer(cfg, len(loaded.vocab), splits)
    model = trainer.model
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    return {
        "overrides": overrides,
        "best_epoch": result.best_epoch,
        "val_perplexity": result.best_heldout_perplexity,
        "test_perplexity": perplexity(model, splits.test, rows=cfg.train.batch_size),
        "train_perplexity": result.final_train_perplexity,
        "seconds": round(seconds, 1),
        "tokens_per_sec": round(result.tokens_per_sec),
        "step_mode": result.step_mode,
    }


def main() -> None:
    """Run the candidates and print a table sorted by validation perplexity."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="path of timemachine.txt")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", type=int, default=1, help="candidates trained at once")
    p.add_argument("--candidates", help="JSON list of override dicts (default: the built-in list)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._one is not None:
        print(json.dumps(trial(a.data, a.device, json.loads(a._one))))
        return
    candidates = json.loads(a.candidates) if a.candidates else CANDIDATES

    def launch(overrides: dict) -> dict:
        cmd = [sys.executable, __file__, "--data", a.data, "--device", a.device, "--_one", json.dumps(overrides)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            return {"overrides": overrides, "error": proc.stderr.strip().splitlines()[-1:]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(launch, candidates))
    ok = sorted((r for r in results if "error" not in r), key=lambda r: r["val_perplexity"])
    print("| overrides | best epoch | val ppl | test ppl | train ppl | seconds | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in ok:
        print(
            f"| `{json.dumps(r['overrides'])}` | {r['best_epoch']} | {r['val_perplexity']:.3f} | "
            f"{r['test_perplexity']:.3f} | {r['train_perplexity']:.3f} | {r['seconds']} | {r['tokens_per_sec']:,} |"
        )
    for r in results:
        if "error" in r:
            print(f"failed: {r['overrides']}: {r['error']}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
