"""Whole-pipeline timing: ``deeprnn run`` from launch to exit, split into start-up, training and wrap-up.

Runs the command ``--runs`` times in one fresh folder (fresh ``PREFECT_HOME``, MLflow store and corpus
cache), so the first run pays for creating Prefect's database, the MLflow store and the download, and the
later ones show the steady state. Start-up = launch to the first training step (imports, Prefect's temporary
API server, MLflow run, download, vocabulary); wrap-up = last training step to process exit (evaluation,
generation, logging the model and artifacts, shutting down).

``--servers running`` runs against a running ``prefect server start`` and ``mlflow server`` (started by the
benchmark on free ports of 127.0.0.1, their own databases in the folder, see ``running_servers.py``) instead of
Prefect's temporary server and a local sqlite store; ``--servers both`` interleaves the two modes run by run and
prints their phases side by side (medians).

``--against PATH`` times another checkout of deeprnn (an earlier commit: ``git worktree add /tmp/old REF``)
in the same session, each in its own fresh folder, the runs interleaved (this, other, this, other, ...), so
the two are measured side by side under the same load.

    python bench/pipeline_overhead.py --runs 2 -- --preset d2l-9.3
    python bench/pipeline_overhead.py --runs 3 --against /tmp/old -- --preset d2l-9.3 --epochs 2
    python bench/pipeline_overhead.py --runs 5 --servers both --against /tmp/old -- --preset smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "timemachine.txt"
# Where the command's module is, in this checkout and in earlier ones (for --against).
CLI_MODULES = ("deeprnn.cli.app", "cli.app", "flows.cli")


def fresh_env(work: Path, repo: Path, servers: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user's first command in ``work``: new Prefect home, MLflow store and cache, no
    configured Prefect API (so Prefect's temporary server is used), ``repo``'s code; with ``servers``, the
    running servers' ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` instead."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(work / "prefect-home"),
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        DEEPRNN_CACHE_DIR=str(work / "cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    )
    env.update(servers or {})
    return env


# The finer breakdown: (label, from stamp, to stamp); stamps come from the run's --json output.
PHASES = [
    ("imports + Prefect API", "launched", "cli_ready_at"),
    ("flow run start", "cli_ready_at", "pipeline_started_at"),
    ("MLflow run, data, model", "pipeline_started_at", "fit_started_at"),
    ("training", "fit_started_at", "fit_finished_at"),
    ("evaluation + samples", "fit_finished_at", "evaluated_at"),
    ("MLflow logging", "evaluated_at", "logged_at"),
    ("flow run end", "logged_at", "flow_returned_at"),
    ("exit", "flow_returned_at", "exited"),
]


def phases(launched: float, stamps: dict[str, float], exited: float) -> dict[str, float | None]:
    """Seconds per phase of ``PHASES`` (None where a stamp is missing, e.g. from older code)."""
    t = {"launched": launched, "exited": exited, **stamps}
    return {name: round(t[b] - t[a], 2) if a in t and b in t else None for name, a, b in PHASES}


def time_run(
    repo: Path, work: Path, index: int, data_url: str, args: list[str], servers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``deeprnn run`` once from ``repo``'s code in ``work`` (against ``servers`` when given); returns its
    phases in seconds."""
    out = work / f"run{index}.json"
    cli = next(m for m in CLI_MODULES if (repo / (m.replace(".", "/") + ".py")).is_file())
    cmd = [sys.executable, "-m", cli, "run", "--data-url", data_url, "--json", str(out), *args]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=work, env=fresh_env(work, repo, servers), capture_output=True, text=True)
    exited = time.time()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"run {index} of {repo} failed with exit code {proc.returncode}")
    r = json.loads(out.read_text())
    return {
        "phases": phases(launched, r.get("timings", {}), exited),
        "run": index + 1,
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


def median_phases(rows: list[dict[str, Any]], variants: list[str]) -> None:
    """Each phase's median per variant, side by side (runs after the first when there are several)."""
    later = [r for r in rows if r["run"] > 1] or rows
    print(f"\n| phase (median of runs {'2+' if later is not rows else 'all'}) | " + " | ".join(variants) + " |")
    print("| --- | " + " | ".join("---" for _ in variants) + " |")
    for name in [*(name for name, _, _ in PHASES), "total"]:
        cells = []
        for v in variants:
            values = [r["total_s"] if name == "total" else r["phases"][name] for r in later if r["variant"] == v]
            values = [x for x in values if x is not None]
            cells.append(f"{statistics.median(values):.2f}" if values else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    """Time the runs and print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-url", default=str(DEFAULT_DATA), help="corpus URL or path passed to deeprnn run")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--workdir", help="folder to run in (default: a new temporary one)")
    p.add_argument("--against", help="another deeprnn checkout to time side by side (e.g. an earlier commit)")
    p.add_argument(
        "--servers",
        choices=["temporary", "running", "both"],
        default="temporary",
        help="Prefect's temporary server and a sqlite MLflow store, a running prefect server and mlflow "
        "server, or both interleaved",
    )
    p.add_argument("--json", help="write the figures here")
    p.add_argument("args", nargs="*", help="extra arguments for deeprnn run (after --)")
    a = p.parse_args()
    root = Path(a.workdir or tempfile.mkdtemp(prefix="deeprnn-pipeline-"))
    codes = {"this": REPO} | ({"other": Path(a.against).resolve()} if a.against else {})
    modes = ["temporary", "running"] if a.servers == "both" else [a.servers]
    variants = [f"{code} {mode}" if len(modes) > 1 else code for code in codes for mode in modes]
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = None
        if "running" in modes:
            from running_servers import running_servers

            servers = stack.enter_context(running_servers(root / "servers"))
            print(f"running servers: {servers}", flush=True)
        for i in range(a.runs):
            for label, repo in codes.items():
                for mode in modes:
                    variant = f"{label} {mode}" if len(modes) > 1 else label
                    work = root / variant.replace(" ", "-") if len(variants) > 1 else root
                    work.mkdir(parents=True, exist_ok=True)
                    found = time_run(repo, work, i, a.data_url, a.args, servers if mode == "running" else None)
                    rows.append({"code": label, "mode": mode, "variant": variant, **found})
                    print(f"{variant} run {i + 1}: {found['total_s']} s", file=sys.stderr, flush=True)
    print_tables(rows, variants, codes, a.runs)
    if a.json:
        Path(a.json).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))


def print_tables(rows: list[dict[str, Any]], variants: list[str], codes: dict[str, Path], runs: int) -> None:
    """Every run (whole and by phase), the phases' medians side by side, the samples."""
    print("| code | run | total s | start-up s | training s | wrap-up s | train ppl | test ppl | tokens/s | device |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['run']} | {r['total_s']} | {r['startup_s']} | {r['training_s']} | "
            f"{r['wrapup_s']} | {r['final_train_perplexity']:.3f} | {r['test_perplexity']:.2f} | "
            f"{r['tokens_per_sec']:,.0f} | {r['device']} ({r['step_mode']}) |"
        )
    print("\n| code | run | " + " | ".join(name for name, _, _ in PHASES) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in PHASES) + " |")
    for r in rows:
        cells = ["-" if v is None else f"{v:.2f}" for v in r["phases"].values()]
        print(f"| {r['variant']} | {r['run']} | " + " | ".join(cells) + " |")
    if len(variants) > 1:
        median_phases(rows, variants)
    if len(codes) > 1 and runs > 1 and len(variants) == 2:  # steady state: runs after the first, medians per code
        print("\n| phase (runs 2+, median) | this | other | other / this |")
        print("| --- | --- | --- | --- |")
        for phase in ("total_s", "startup_s", "training_s", "wrapup_s"):
            med = {c: statistics.median(r[phase] for r in rows if r["code"] == c and r["run"] > 1) for c in codes}
            ratio = med["other"] / med["this"]
            print(f"| {phase.removesuffix('_s')} | {med['this']:.1f} s | {med['other']:.1f} s | {ratio:.2f}x |")
    for r in rows:
        for s in r["samples"]:
            print(f"  {r['variant']} run {r['run']}: {s}")


if __name__ == "__main__":
    main()
