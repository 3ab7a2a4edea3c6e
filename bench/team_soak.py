"""Soak: K concurrent ``deeprnn run`` commands for T minutes on a team's stack (PostgreSQL under Prefect and MLflow,
see ``docs/team-stack.md``) against the same on the embedded defaults (Prefect's temporary API, a sqlite MLflow
store in the folder), one mode after the other, printed side by side.

Each of the K slots starts a run, waits for it, and starts the next until T minutes have passed (a run started
before the end finishes). On the embedded defaults every slot shares one folder, as users of one machine do: one
``PREFECT_HOME``, one ``./mlflow.db``. On the team's stack every slot has its own home and token cache and shares
only the servers' URLs, as workers on separate machines do.

What is counted, per mode:

- ``completed``: the command exited 0 and its MLflow run is FINISHED; ``failed``: any other exit;
- ``lost``: a run the command reported that MLflow does not hold as FINISHED, or whose training curve misses a step;
- ``duplicated``: MLflow runs of the mode's experiment that no command reported, and curve steps logged twice;
- ``overhead``: a run's wall time less its training time (the command's ``--json`` stamps), median and p95;
- ``peak connections``: most client connections PostgreSQL held at once (``pg_stat_activity``, polled each second).

    python bench/team_soak.py --concurrency 8 --minutes 3 --out bench/results/cpu-team-soak.md
    python bench/team_soak.py --concurrency 2 --minutes 1 -- --preset smoke --epochs 1    (a quick look)

The corpus is the book from ``../shared/data`` when it is there (``--data`` for another text), served over
HTTP on 127.0.0.1 so every run downloads it as a worker would.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import team_stack  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "timemachine.txt"
DEFAULT_ARGS = ["--preset", "smoke", "--epochs", "2", "--device", "cpu"]
CURVE = "train_perplexity"  # a metric logged once per epoch: its steps show a lost or doubled record


@dataclass
class Launch:
    """One ``deeprnn run`` of a slot: when it ran, how it ended, what it reported."""

    slot: int
    started: float
    ended: float = 0.0
    returncode: int | None = None
    run_id: str | None = None
    training_s: float | None = None
    tail: str = ""

    @property
    def overhead_s(self) -> float | None:
        """Wall time less training time: everything the stack adds around the training."""
        return None if self.training_s is None else self.ended - self.started - self.training_s


@dataclass
class ModeResult:
    """What one mode's soak measured."""

    mode: str
    launches: list[Launch] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    peak_connections: int | None = None
    wall_s: float = 0.0


def serve_folder(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``folder`` over HTTP on a free port of 127.0.0.1; returns the server and its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined, method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def slot_env(mode: str, work: Path, slot: int, servers: dict[str, str]) -> dict[str, str]:
    """The environment of a slot: the shared folder's stores (embedded) or its own home and the servers (team)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DEEPRNN_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if mode == "embedded":
        env.update(
            PREFECT_HOME=str(work / "prefect-home"),
            MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
            DEEPRNN_CACHE_DIR=str(work / "cache"),
        )
    else:
        home = work / f"host{slot}"
        env.update(
            HOME=str(home), PREFECT_HOME=str(home / ".prefect"), DEEPRNN_CACHE_DIR=str(home / "cache"), **servers
        )
    return env


def run_once(mode: str, work: Path, slot: int, index: int, cmd: list[str], env: dict[str, str]) -> Launch:
    """One run of a slot, from its folder; the ``--json`` record gives its run id and training time."""
    cwd = work if mode == "embedded" else work / f"host{slot}"
    cwd.mkdir(parents=True, exist_ok=True)
    out = cwd / f"run-{slot}-{index}.json"
    launch = Launch(slot=slot, started=time.time())
    proc = subprocess.run([*cmd, "--json", str(out)], cwd=cwd, env=env, capture_output=True, text=True)
    launch.ended, launch.returncode = time.time(), proc.returncode
    launch.tail = (proc.stdout + proc.stderr)[-1500:]
    if proc.returncode == 0 and out.is_file():
        record = json.loads(out.read_text())
        launch.run_id = record["run_id"]
        launch.training_s = record["fit_finished_at"] - record["fit_started_at"]
    return launch


def soak(
    mode: str, work: Path, concurrency: int, minutes: float, cmd: list[str], servers: dict[str, str]
) -> ModeResult:
    """K slots, each running one command after another until ``minutes`` have passed."""
    result = ModeResult(mode)
    deadline = time.monotonic() + minutes * 60

    def slot_loop(slot: int) -> list[Launch]:
        env = slot_env(mode, work, slot, servers)
        done: list[Launch] = []
        while time.monotonic() < deadline:
            done.append(run_once(mode, work, slot, len(done), cmd, env))
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for launches in pool.map(slot_loop, range(concurrency)):
            result.launches.extend(launches)
    result.wall_s = time.monotonic() - started
    return result


def audit(result: ModeResult, tracking_uri: str, experiment: str) -> None:
    """Count lost and duplicated runs and curve points against what MLflow holds."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = {r.info.run_id: r for r in client.search_runs([found.experiment_id], max_results=5000)} if found else {}
    reported = [launch.run_id for launch in result.launches if launch.run_id]
    result.duplicated = len(set(runs) - set(reported)) + (len(reported) - len(set(reported)))
    for run_id in reported:
        run = runs.get(run_id)
        if run is None or run.info.status != "FINISHED":
            result.lost += 1
            continue
        steps = [m.step for m in client.get_metric_history(run_id, CURVE)]
        expected = int(float(run.data.params.get("train.epochs", len(steps))))
        result.duplicated += len(steps) - len(set(steps))
        result.lost += max(0, expected - len(set(steps)))


def poll_connections(stack: team_stack.Stack, stop: threading.Event, peak: list[int]) -> None:
    """Record the most client connections PostgreSQL holds at once, once a second until ``stop``."""
    import psycopg

    with psycopg.connect(stack.database_url("postgres"), autocommit=True) as conn:
        while not stop.wait(1.0):
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()
            peak[0] = max(peak[0], int(row[0]) - 1)  # less this poller's own connection


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def seconds(values: list[float], summary: Any) -> str:
    """``summary(values)`` to a tenth of a second, or ``-`` when there are none."""
    return f"{summary(values):.1f}" if values else "-"


def table(results: list[ModeResult], concurrency: int, minutes: float) -> Iterator[str]:
    """The side-by-side table, as markdown lines."""
    yield f"| {concurrency} concurrent runs, {minutes:g} min | " + " | ".join(r.mode for r in results) + " |"
    yield "| --- | " + " | ".join("---" for _ in results) + " |"

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in results) + " |"

    def overheads(r: ModeResult) -> list[float]:
        return [x for x in (launch.overhead_s for launch in r.launches) if x is not None]

    yield row("runs started", lambda r: str(len(r.launches)))
    yield row("completed", lambda r: str(sum(1 for x in r.launches if x.returncode == 0)))
    yield row("failed", lambda r: str(sum(1 for x in r.launches if x.returncode != 0)))
    yield row("lost", lambda r: str(r.lost))
    yield row("duplicated", lambda r: str(r.duplicated))
    yield row(
        "overhead per run, median (s)", lambda r: f"{statistics.median(overheads(r)):.1f}" if overheads(r) else "-"
    )
    yield row("overhead per run, p95 (s)", lambda r: f"{percentile(overheads(r), 0.95):.1f}" if overheads(r) else "-")
    yield row("peak database connections", lambda r: "-" if r.peak_connections is None else str(r.peak_connections))
    yield row("wall (s)", lambda r: f"{r.wall_s:.0f}")


def main() -> None:
    """Parse the options, soak both modes one after the other, print the table (and write it with ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8, help="runs at once (default 8)")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long each mode keeps starting runs")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the text every run trains on")
    parser.add_argument("--modes", default="embedded,team", help="which modes, in order (embedded, team)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("run_args", nargs="*", help="after --: the arguments of every `deeprnn run`")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no text at {args.data}: give one with --data")
    http_server, base = serve_folder(args.data.parent)
    run_args = args.run_args or DEFAULT_ARGS
    results = []
    with tempfile.TemporaryDirectory(prefix="deeprnn-soak-") as tmp:
        for mode in args.modes.split(","):
            work = Path(tmp) / mode
            work.mkdir()
            experiment = f"soak-{mode}"
            cmd = [sys.executable, "-m", "deeprnn.cli.app", "run", "--data-url", f"{base}/{args.data.name}"]
            cmd += ["--experiment", experiment, *run_args]
            print(f"{mode}: {args.concurrency} runs at once for {args.minutes:g} min ...", flush=True)
            if mode == "embedded":
                result = soak(mode, work, args.concurrency, args.minutes, cmd, {})
                audit(result, f"sqlite:///{work / 'mlflow.db'}", experiment)
            else:
                result = soak_team(work, args.concurrency, args.minutes, cmd, experiment)
            for launch in result.launches:
                if launch.returncode != 0:
                    print(f"  a run of slot {launch.slot} failed ({launch.returncode}):\n{launch.tail}", flush=True)
            results.append(result)
    http_server.shutdown()
    lines = list(table(results, args.concurrency, args.minutes))
    print("\n".join(["", *lines]))
    if args.out:
        command = " ".join(["python bench/team_soak.py", *sys.argv[1:]])
        args.out.write_text("\n".join([f"`{command}` ({os.cpu_count()} CPUs)", "", *lines, ""]))


def soak_team(work: Path, concurrency: int, minutes: float, cmd: list[str], experiment: str) -> ModeResult:
    """The soak on a team's stack brought up in ``work`` (and taken down after), connections polled meanwhile."""
    stack = team_stack.up(work / "stack")
    try:
        servers = {"PREFECT_API_URL": stack.prefect_api_url, "MLFLOW_TRACKING_URI": stack.mlflow_url}
        stop, peak = threading.Event(), [0]
        poller = threading.Thread(target=poll_connections, args=(stack, stop, peak), daemon=True)
        poller.start()
        result = soak("team", work, concurrency, minutes, cmd, servers)
        stop.set()
        poller.join(timeout=10)
        result.peak_connections = peak[0]
        audit(result, stack.mlflow_url, experiment)
        return result
    finally:
        team_stack.down(work / "stack")


if __name__ == "__main__":
    main()
