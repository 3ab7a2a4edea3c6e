"""scripts/team_stack.py end to end: PostgreSQL under a Prefect server and an MLflow server (proxied artifacts),
process workers in empty folders that know only the servers' URLs, a smoke deployment run on one of them, and
``down``, which leaves no process behind."""

from __future__ import annotations

import getpass
import os
import socket
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from corpora import CORPUS_SHA1
from mlflow.tracking import MlflowClient
from team_stack_fixture import prefect_api, run_deployment, stack_script, team_stack, wait_for_flow_run, worker_logs

pytestmark = pytest.mark.e2e
__all__ = ["team_stack"]  # the fixture, imported for pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def query(stack: Any, database: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` in one of the stack's databases, read by the deeprnn role over TCP."""
    with psycopg.connect(stack.database_url(database)) as connection:
        return connection.execute(sql, args).fetchall()


def worker_environ(pid: int) -> dict[str, str]:
    """The environment a running process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_servers_keep_their_state_in_postgresql(team_stack: Any) -> None:
    client = MlflowClient(tracking_uri=team_stack.mlflow_url)
    experiment_id = client.create_experiment("team-stack-check")
    rows = query(
        team_stack,
        "mlflow",
        "SELECT name, artifact_location FROM experiments WHERE experiment_id = %s",
        int(experiment_id),
    )
    # Proxied artifacts: the server stores them, the experiment names no folder of any client.
    assert rows == [("team-stack-check", f"mlflow-artifacts:/{experiment_id}")]

    tables = {
        row[0] for row in query(team_stack, "prefect", "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert {"flow_run", "deployment", "work_pool", "automation"} <= tables
    deployments = {row[0] for row in query(team_stack, "prefect", "SELECT name FROM deployment")}
    assert {"smoke", "evaluate", "d2l-9.3", "adaptive-sweep"} <= deployments
    automations = {row[0] for row in query(team_stack, "prefect", "SELECT name FROM automation")}
    assert "deeprnn-crash-zombie-flow-runs" in automations  # `deeprnn setup-server` ran
    assert query(team_stack, "optuna", "SELECT current_database(), current_user") == [("optuna", "deeprnn")]
    # PostgreSQL never runs as root: its data belongs to `postgres` then, in a folder that user can reach.
    owner = "postgres" if os.geteuid() == 0 else getpass.getuser()
    assert Path(team_stack.pg_folder, "data").owner() == owner
    with pytest.raises(stack_script.StackError, match="is running"):
        stack_script.up(team_stack.root)  # a second `up` on a running stack is refused and changes nothing
    assert all(stack_script.status(team_stack).values())


def test_workers_start_in_empty_folders_with_only_the_servers_urls(team_stack: Any) -> None:
    allowed = {"HOME", "PREFECT_HOME", "DEEPRNN_CACHE_DIR", *team_stack.team_env(), *stack_script.WORKER_BASICS}
    allowed |= {k.lower() for k in stack_script.WORKER_BASICS}
    for name in team_stack.workers:
        pid = team_stack.pids[f"worker:{name}"]
        env = worker_environ(pid)
        assert set(env) <= allowed, set(env) - allowed
        assert {k: env[k] for k in team_stack.team_env()} == team_stack.team_env()
        folder = team_stack.root / "workers" / name
        assert Path(os.readlink(f"/proc/{pid}/cwd")) == folder / "work"
        assert str(PROJECT_ROOT) not in " ".join(v for k, v in env.items() if k != "PATH")
    # Both workers poll the pool (the server knows them by name).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        known = prefect_api(team_stack, "POST", f"/work_pools/{stack_script.POOL}/workers/filter", json={}).json()
        if {w["name"] for w in known} >= set(team_stack.workers):
            break
        time.sleep(1)
    assert {w["name"] for w in known} >= set(team_stack.workers), worker_logs(team_stack)


def test_smoke_deployment_runs_on_a_worker_and_its_artifacts_live_on_the_server(team_stack: Any, book_url: str) -> None:
    parameters = {"train": {"epochs": 1, "device": "cpu"}, "data": {"url": book_url, "sha1": CORPUS_SHA1}}
    flow_run_id = run_deployment(team_stack, "deeprnn-train/smoke", parameters)
    flow_run = wait_for_flow_run(team_stack, flow_run_id)
    assert flow_run["state_type"] == "COMPLETED", worker_logs(team_stack)

    client = MlflowClient(tracking_uri=team_stack.mlflow_url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert run.info.status == "FINISHED" and run.data.params["preset"] == "smoke"
    assert query(team_stack, "mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run.info.run_id) == [
        ("FINISHED",)
    ]
    assert query(team_stack, "prefect", "SELECT state_type::text FROM flow_run WHERE id = %s", flow_run_id) == [
        ("COMPLETED",)
    ]
    # The artifacts went through the server into its folder; no client kept an MLflow store of its own.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {"samples.json", "checkpoints"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    stored = team_stack.root / "artifacts" / run.info.experiment_id / run.info.run_id / "artifacts"
    assert (stored / "samples.json").is_file()
    folders = [team_stack.root / "workers" / name / "work" for name in team_stack.workers]
    ran_in = [folder for folder in folders if (folder / "runs" / run.info.run_id).is_dir()]
    assert len(ran_in) == 1, "the run's folder is in the working folder of the worker that ran it"
    for folder in folders:
        assert not {"mlruns", "mlartifacts", "mlflow.db"} & {p.name for p in folder.iterdir()}


def test_down_leaves_no_process_and_is_safe_to_repeat(team_stack: Any) -> None:
    groups = list(team_stack.pids.values())
    ports = (team_stack.pg_port, team_stack.prefect_port, team_stack.mlflow_port)
    flow_runs = set().union(*(stack_script.descendants(team_stack.pids[f"worker:{n}"]) for n in team_stack.workers))
    assert stack_script.postgres_running(team_stack)

    started = time.monotonic()
    stack_script.down(team_stack.root)
    seconds = time.monotonic() - started
    assert not any(stack_script.group_members(pgid) for pgid in groups)
    assert not [pid for pid in flow_runs if alive(pid)], "flow runs outlived their worker"
    assert not stack_script.postgres_running(team_stack)
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    stack_script.down(team_stack.root)  # again: nothing to stop, no error
    assert not any(stack_script.status(stack_script.Stack.load(team_stack.root)).values())
    print(f"team stack: up {team_stack.startup_seconds:.1f} s, down {seconds:.1f} s")
