"""Whole-pipeline timing: ``deeprnn run`` from launch to exit, split into start-up, training and wrap-up.

Runs the command ``--runs`` times in one fresh folder (fresh ``PREFECT_HOME``, MLflow store and corpus
cache), so the first run pays for creating Prefect's database, the MLflow store and the download, and the
later ones show the steady state. Start-up = launch to the first training step (imports, ephemeral Prefect
API, MLflow run, download, vocabulary); wrap-up = last training step to process exit (evaluation,
generation, logging the model and artifacts, shutting down).

    python bench/pipeline_overhead.py --data-url /path/to/timemachine.txt --runs 2 -- --preset d2l-9.3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "timemachine.txt"


def main() -> None:
    """Time the runs and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-url", default=str(DEFAULT_DATA), help="corpus URL or path passed to deeprnn run")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--workdir", help="folder to run in (default: a new temporary one)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("args", nargs="*", help="extra arguments for deeprnn run (after --)")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="deeprnn-pipeline-"))
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(work / "prefect-home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        DEEPRNN_CACHE_DIR=str(work / "cache"),
    )
    env.pop("PREFECT_API_URL", None)  # the ephemeral API, as a user's first command gets
    rows = []
    for i in range(a.runs):
        out = work / f"run{i}.json"
        cmd = [sys.executable, "-m", "flows.cli", "run", "--data-url", a.data_url, "--json", str(out), *a.args]
        launched = time.time()
        proc = subprocess.run(cmd, cwd=work, env={**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}, capture_output=True, text=True)
        exited = time.time()
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"run {i} failed with exit code {proc.returncode}")
        r = json.loads(out.read_text())
        rows.append(
            {
                "run": i + 1,
                "total_s": round(exited - launched, 2),
                "startup_s": round(r["fit_started_at"] - launched, 2),
                "training_s": round(r["fit_finished_at"] - r["fit_started_at"], 2),
                "wrapup_s": round(exited - r["fit_finished_at"], 2),
                "final_train_perplexity": r["metrics"]["final_train_perplexity"],
                "test_perplexity": r["metrics"]["test_perplexity"],
                "tokens_per_sec": r["metrics"]["mean_tokens_per_sec"],
                "device": r["device"],
                "step_mode": r["step_mode"],
                "samples": list(r["samples"].values()),
            }
        )
    print("| run | total s | start-up s | training s | wrap-up s | train ppl | test ppl | tokens/s | device |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['run']} | {r['total_s']} | {r['startup_s']} | {r['training_s']} | {r['wrapup_s']} | "
            f"{r['final_train_perplexity']:.3f} | {r['test_perplexity']:.2f} | {r['tokens_per_sec']:,.0f} | "
            f"{r['device']} ({r['step_mode']}) |"
        )
    for r in rows:
        for s in r["samples"]:
            print(f"  run {r['run']}: {s}")
    if a.json:
        Path(a.json).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
