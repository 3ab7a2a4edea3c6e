"""A team's stack end to end (``scripts/team_stack.py``): PostgreSQL under a Prefect server, an MLflow server
(proxied artifacts) and the Optuna storage, and two process workers in empty folders that know only the servers'
URLs. The corpus comes by URL from a server on 127.0.0.1.

One stack for the module (bringing it up is the costly part), its tests in an order that keeps the disruptive
ones from breaking the others: the servers' state and the workers' environments first; then a worker is killed
mid-training, and while its flow run waits to be found a zombie (then alerted, its MLflow run closed), a
`deeprnn run` moves between two folders that share nothing (Ctrl-C in one, ``--resume`` in the other) through a
30 s MLflow outage and a PostgreSQL restart. Then the killed run resumes on the other worker, eight deployment
runs (their artifacts on the server, no MLflow store on any worker) and an adaptive sweep run at once, a sweep
killed mid-way is continued, no log shows a pool or lock error, and ``down`` leaves no process behind."""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import psycopg
import pytest
from corpora import CORPUS_SHA1
from live_servers import AlertReceiver
from mlflow.tracking import MlflowClient
from team_stack_fixture import (
    PROJECT_ROOT,
    prefect_api,
    run_deployment,
    stack_script,
    team_stack,
    wait_for_flow_run,
    worker_logs,
)

pytestmark = pytest.mark.e2e
__all__ = ["team_stack"]  # the stack's fixture, imported for pytest

ZOMBIE_AFTER = 60  # two missed heartbeats (every 30 s, Prefect's minimum, from the pool's job variables)
MLFLOW_DOWN = 30.0  # seconds the MLflow server is down while a run trains
MLFLOW_LAG = 20.0  # at most this long from the MLflow server's return to the run's next epoch logged
EPOCHS = 40  # of the runs that are stopped and resumed: each epoch is short, the stop lands mid-training
LOAD_RUNS, SWEEP_TRIALS = 8, 6
# What a pool or a store says when it runs out of connections or locks: never in any log of the stack.
POOL_ERRORS = ("database is locked", "QueuePool limit", "too many clients", "remaining connection slots")
TIMEOUT = 400.0
CURVES = ("train_perplexity", "heldout_perplexity", "lr")


@dataclass
class Team:
    """The stack, the corpus's URL, the alerts it sent, the commands' logs and what the scenarios measured
    (seconds)."""

    stack: Any
    url: str
    alerts: AlertReceiver
    logs: dict[int, Path] = field(default_factory=dict)  # process id -> its output
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.stack.mlflow_url)

    def machine(self, name: str) -> tuple[Path, dict[str, str]]:
        """A fresh folder with its own HOME, Prefect home and corpus cache, and only the servers' URLs."""
        folder = self.stack.root / "machines" / name
        for sub in ("work", "home", "cache"):
            (folder / sub).mkdir(parents=True)
        return folder / "work", {**stack_script.worker_env(self.stack, folder), "OMP_NUM_THREADS": "1"}

    def start(self, name: str, where: tuple[Path, dict[str, str]], *args: str) -> subprocess.Popen:
        """``deeprnn ARGS`` on a machine, in a process group of its own, output to ``logs/NAME.log``."""
        log = self.stack.root / "logs" / f"{name}.log"
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "deeprnn.cli.app", *args],
                cwd=where[0],
                env=where[1],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs[proc.pid] = log
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
        """Wait for a command; its exit code and output."""
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        return code, self.logs[proc.pid].read_text(errors="replace")

    def run_of(self, flow_run_id: str) -> Any:
        """The MLflow run(s) a flow run opened."""
        experiments = [e.experiment_id for e in self.mlflow.search_experiments()]
        return self.mlflow.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")

    def checkpointed(self, run_id: str) -> bool:
        """Whether the run's resumable checkpoint is in MLflow."""
        return any(f.path.endswith("last.pt") for f in self.mlflow.list_artifacts(run_id, "checkpoints"))

    def steps(self, run_id: str, key: str = "train_perplexity") -> list[int]:
        """The steps of a metric's history, in the order MLflow keeps them."""
        return sorted(m.step for m in self.mlflow.get_metric_history(run_id, key))


def until(what: str, check: Callable[[], Any], timeout: float = TIMEOUT, every: float = 0.5) -> Any:
    """Poll ``check()`` until it returns something true; that value. Fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def run_args(url: str, epochs: int = EPOCHS) -> list[str]:
    """A smoke run short per epoch, checkpointed every epoch."""
    data = ["--data-url", url, "--data-sha1", CORPUS_SHA1, "--max-tokens", "20000", "--test-fraction", "0.05"]
    return ["--preset", "smoke", "--device", "cpu", "--epochs", str(epochs), "--checkpoint-every", "1", *data]


def deployment_params(url: str, experiment: str, max_tokens: int = 20000, **train: Any) -> dict[str, Any]:
    """A smoke deployment run's parameters (the sections given replace the deployment's)."""
    return {
        "data": {"url": url, "sha1": CORPUS_SHA1, "max_tokens": max_tokens, "test_fraction": 0.05},
        "train": {"device": "cpu", **train},
        "experiment": experiment,
        "registered_model": experiment,
    }


def sweep_args(url: str, study: str, trials: int) -> list[str]:
    """An adaptive sweep of the smallest trials on the stack's PostgreSQL study storage."""
    fixed = ["--param", "model.num_hiddens=16", "--param", "data.val_fraction=0.1", "--param", "train.max_steps=40"]
    return [
        *("sweep", "--search", "optuna", "--preset", "smoke", "--lr", "0.5,1,2", *fixed, "--epochs", "100"),
        *("--device", "cpu", "--data-url", url, "--data-sha1", CORPUS_SHA1, "--study", study),
        *("--experiment", study, "--no-register-best", "--max-trials", str(trials), "--workers", "1"),
    ]


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
    assert {"smoke", "evaluate", "d2l-9.3", "sweep"} <= deployments
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


@pytest.fixture(scope="module")
def team(team_stack: Any, book_url: str) -> Iterator[Team]:
    """The stack set up for this module: two training slots (one per worker), zombies after 60 s, alerts to a
    receiver on 127.0.0.1; no evaluation after each training (it would double the load of every scenario)."""
    env = {**os.environ, **team_stack.team_env()}
    alerts = AlertReceiver()
    setup = ["setup-server", "--training-slots", "2", "--zombie-after", str(ZOMBIE_AFTER)]
    setup += ["--alert-webhook", alerts.url, "--allow-private-urls"]
    done = subprocess.run(
        [sys.executable, "-m", "deeprnn.cli.app", *setup], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for automation in prefect_api(team_stack, "POST", "/automations/filter", json={}).json():
        if automation["name"] == "evaluate-after-training":
            answer = prefect_api(team_stack, "PATCH", f"/automations/{automation['id']}", json={"enabled": False})
            assert answer.status_code == 204, answer.text
    try:
        yield Team(team_stack, book_url, alerts)
    finally:
        alerts.stop()


@pytest.fixture(scope="module")
def killed(team: Team) -> dict[str, Any]:
    """A smoke deployment run killed with its worker (SIGKILL to the group) once MLflow holds its checkpoint;
    beside it, `deeprnn run` started in folder A (before the kill: its look for orphaned runs of this host
    must not be the one that closes the killed run). A starts once the deployment run has opened its MLflow
    run, not before: a worker takes longer to start a run than A takes to train, on an idle machine."""
    params = deployment_params(team.url, "team-killed-worker", epochs=EPOCHS, checkpoint_every=1)
    flow_run_id = run_deployment(team.stack, "deeprnn-train/smoke", params)
    until("the deployment run's MLflow run", lambda: team.run_of(flow_run_id))
    a = team.machine("a")
    host_a = team.start(
        "host-a",
        a,
        "run",
        *run_args(team.url),
        *("--experiment", "team-moved", "--registered-model", "team-moved"),
    )
    a_run = until("a checkpoint in folder A", lambda: [p.parent.name for p in a[0].glob("runs/*/last.pt")])[0]
    runs = until("the deployment run's checkpoint in MLflow", lambda: [
        r for r in team.run_of(flow_run_id) if team.checkpointed(r.info.run_id)
    ])  # fmt: skip
    pid = int(runs[0].data.tags["deeprnn.pid"])
    (worker,) = [w for w in team.stack.workers if pid in stack_script.descendants(team.stack.pids[f"worker:{w}"])]
    stack_script.kill_worker(team.stack, worker)
    return {
        **{"flow_run_id": flow_run_id, "run_id": runs[0].info.run_id, "worker": worker, "at": time.monotonic()},
        **{"params": params, "host_a": host_a, "a_run": a_run},
    }


@pytest.fixture(scope="module")
def moved(team: Team, killed: dict[str, Any]) -> dict[str, Any]:
    """The run of folder A: the MLflow server down 30 s while it trains, then Ctrl-C; then ``--resume`` in
    folder B, which has none of A's files, PostgreSQL restarted while it trains. (Runs while ``killed``'s
    flow run waits to be found a zombie.)"""
    proc, run_id = killed["host_a"], killed["a_run"]
    until("A's checkpoint in MLflow", lambda: team.checkpointed(run_id))
    before = team.steps(run_id)[-1]
    stack_script.stop_mlflow(team.stack)
    time.sleep(MLFLOW_DOWN)
    stack_script.start_mlflow(team.stack)
    back = time.monotonic()
    # It goes on (the client's retries outlast the outage) or stops saying how to resume: either is fine.
    until("a new epoch logged, or the run stopped", lambda: proc.poll() is not None or team.steps(run_id)[-1] > before)
    team.seconds["MLflow back to the next epoch logged"] = lag = time.monotonic() - back
    proc_a_went_on = proc.poll() is None
    if proc_a_went_on:
        os.killpg(proc.pid, signal.SIGINT)
    code_a, out_a = team.finish(proc, timeout=120)
    stopped = {"status": team.mlflow.get_run(run_id).info.status, "steps": team.steps(run_id)}
    # B starts once the killed worker's run is closed: B's own look for orphaned runs of this host would
    # close it too (a real team's hosts differ; here they are one machine).
    until("the killed run closed", lambda: team.mlflow.get_run(killed["run_id"]).info.status != "RUNNING")
    b = team.machine("b")
    files_b = sorted(p.name for p in b[0].parent.rglob("*") if p.is_file())
    started = time.monotonic()
    proc = team.start("host-b", b, "run", "--resume", run_id)
    until("B's first resumed epoch", lambda: team.steps(run_id)[-1] > stopped["steps"][-1])
    restart = time.monotonic()
    stack_script.restart_postgres(team.stack)
    team.seconds["PostgreSQL restart"] = time.monotonic() - restart
    code_b, out_b = team.finish(proc)
    team.seconds["resume in folder B"] = time.monotonic() - started
    return {
        **{"run_id": run_id, "a": (code_a, out_a), "b": (code_b, out_b), "stopped": stopped},
        **{"files_b": files_b, "folder_b": b[0], "went_on": proc_a_went_on, "lag": lag},
    }


def test_a_run_stopped_on_one_host_resumes_on_another_through_an_mlflow_outage_and_a_postgres_restart(
    team: Team, moved: dict[str, Any]
) -> None:
    run_id, (code_a, out_a), (code_b, out_b) = moved["run_id"], moved["a"], moved["b"]
    # The client's bounded retries (deeprnn.tracking.store.HTTP_RETRIES) outlast the outage, and no request
    # sleeps long after the server's return: the run goes on at once.
    assert moved["went_on"], out_a[-3000:]
    assert moved["lag"] < MLFLOW_LAG, f"next epoch logged {moved['lag']:.0f} s after MLflow came back"
    assert code_a in (130, 1), out_a[-3000:]  # Ctrl-C once the run went on, or its own stop in the outage
    assert "Traceback" not in out_a, out_a[-3000:]
    # Ctrl-C while a request waits out the client's retry backoff ends the command after its grace period
    # with one line that does not name the run (and leaves it RUNNING, for the next command to close).
    assert f"--resume {run_id}" in out_a or "did not stop within" in out_a, out_a[-3000:]
    assert moved["stopped"]["status"] in ("KILLED", "FAILED", "RUNNING")
    assert moved["files_b"] == [], "folder B starts with nothing"
    assert code_b == 0, out_b[-3000:]
    assert "Traceback" not in out_b, out_b[-3000:]
    assert "resuming from the checkpoint at epoch" in out_b
    run = team.mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["deeprnn.resumed_at_epoch"]
    # Nothing lost or doubled: one point per epoch on every curve, one logged model, one registered version.
    for key in CURVES:
        assert team.steps(run_id, key) == list(range(1, EPOCHS + 1)), key
    assert len(team.mlflow.search_runs([run.info.experiment_id])) == 1
    models = team.mlflow.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in models] == [run_id]
    assert [v.run_id for v in team.mlflow.search_model_versions("name='team-moved'")] == [run_id]
    assert team.checkpointed(run_id)
    # B's corpus and checkpoint are its own: downloaded by URL and fetched from the MLflow server.
    home = moved["folder_b"].parent
    assert (home / "cache" / f"{CORPUS_SHA1}.txt").is_file()
    assert (moved["folder_b"] / "runs" / run_id / "last.pt").is_file()


@pytest.mark.team_load
def test_a_killed_worker_run_is_crashed_closed_and_resumed_on_the_other_worker(
    team: Team, killed: dict[str, Any]
) -> None:
    stack, run_id = team.stack, killed["run_id"]
    state = lambda: prefect_api(stack, "GET", f"/flow_runs/{killed['flow_run_id']}").json()["state_type"]  # noqa: E731
    until("the killed flow run marked Crashed", lambda: state() == "CRASHED", timeout=ZOMBIE_AFTER + 240, every=1)
    team.seconds["kill to Crashed"] = time.monotonic() - killed["at"]
    # Nothing reported the kill (the worker died with the run): the server found the heartbeats missing.
    states = prefect_api(stack, "GET", "/flow_run_states/", params={"flow_run_id": killed["flow_run_id"]}).json()
    assert any("no heartbeat" in (s["message"] or "") for s in states if s["type"] == "CRASHED"), states
    until("its MLflow run closed", lambda: team.mlflow.get_run(run_id).info.status != "RUNNING", every=1)
    team.seconds["kill to MLflow FAILED"] = time.monotonic() - killed["at"]
    closed = team.mlflow.get_run(run_id)
    assert closed.info.status == "FAILED"
    reason = closed.data.tags["deeprnn.failure_reason"]
    assert reason.startswith("Prefect flow run") and "crashed" in reason, closed.data.tags
    name = prefect_api(stack, "GET", f"/flow_runs/{killed['flow_run_id']}").json()["name"]
    assert "Crashed" in team.alerts.wait_for(name)["text"]  # the alert names the run and how it ended
    (other,) = [w for w in stack.workers if w != killed["worker"]]
    started = time.monotonic()
    resumed = run_deployment(stack, "deeprnn-train/smoke", {**killed["params"], "resume_run_id": run_id})
    final = wait_for_flow_run(stack, resumed, timeout=TIMEOUT)
    team.seconds["resume on the other worker"] = time.monotonic() - started
    assert final["state_type"] == "COMPLETED", worker_logs(stack)
    run = team.mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and "deeprnn.failure_reason" not in run.data.tags
    for key in CURVES:
        assert team.steps(run_id, key) == list(range(1, EPOCHS + 1)), key
    assert len(team.mlflow.search_runs([run.info.experiment_id])) == 1
    # The other worker had none of it: it fetched the checkpoint from the MLflow server.
    assert (stack.root / "workers" / other / "work" / "runs" / run_id / "last.pt").is_file()
    logs = prefect_api(stack, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [resumed]}}}).json()
    assert any("fetching checkpoints/last.pt from the MLflow run" in entry["message"] for entry in logs)


@pytest.fixture(scope="module")
def load(team: Team, killed: dict[str, Any]) -> dict[str, Any]:
    """Eight smoke deployment runs created at once on the two workers, beside an adaptive sweep of six trials
    on the PostgreSQL study storage."""
    stack = team.stack
    for name in ("worker-1", "worker-2"):
        if name not in stack.workers:
            stack_script.start_worker(stack, name)
    sweep = team.start("sweep-load", team.machine("sweeper"), *sweep_args(team.url, "team-load-sweep", SWEEP_TRIALS))
    started = time.monotonic()
    params = [
        deployment_params(team.url, "team-load", max_tokens=2000, epochs=1, seed=seed) for seed in range(LOAD_RUNS)
    ]
    with ThreadPoolExecutor(LOAD_RUNS) as pool:
        ids = list(pool.map(lambda p: run_deployment(stack, "deeprnn-train/smoke", p), params))
        finals = list(pool.map(lambda i: wait_for_flow_run(stack, i, timeout=TIMEOUT), ids))
    team.seconds["8 runs on 2 workers"] = time.monotonic() - started
    code, out = team.finish(sweep)
    team.seconds["8 runs and the sweep"] = time.monotonic() - started
    return {"finals": finals, "sweep": (code, out)}


@pytest.mark.team_load
def test_eight_deployment_runs_beside_a_sweep_complete_once_each_with_contiguous_versions(
    team: Team, load: dict[str, Any]
) -> None:
    assert [f["state_type"] for f in load["finals"]] == ["COMPLETED"] * LOAD_RUNS
    runs = [team.run_of(f["id"]) for f in load["finals"]]
    assert [len(r) for r in runs] == [1] * LOAD_RUNS, "one MLflow run per flow run, retries included"
    ids = {r[0].info.run_id for r in runs}
    experiment = team.mlflow.get_experiment_by_name("team-load").experiment_id
    assert len(team.mlflow.search_runs([experiment])) == LOAD_RUNS
    versions = team.mlflow.search_model_versions("name='team-load'")
    assert sorted(int(v.version) for v in versions) == list(range(1, LOAD_RUNS + 1))
    assert {v.run_id for v in versions} == ids
    best = min(versions, key=lambda v: float(v.tags["heldout_perplexity"]))
    assert team.mlflow.get_model_version_by_alias("team-load", "champion").version == best.version
    stack = team.stack
    folders = [stack.root / "workers" / name / "work" for name in stack.workers]
    for final, (run,) in zip(load["finals"], runs):
        assert run.info.status == "FINISHED" and run.data.params["preset"] == "smoke"
        assert query(stack, "mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run.info.run_id) == [("FINISHED",)]
        assert query(stack, "prefect", "SELECT state_type::text FROM flow_run WHERE id = %s", final["id"]) == [
            ("COMPLETED",)
        ]
        # The artifacts went through the server into its folder; the run's folder is in the working folder
        # of the worker that ran it.
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert {"samples.json", "checkpoints"} <= {a.path for a in team.mlflow.list_artifacts(run.info.run_id)}
        stored = stack.root / "artifacts" / run.info.experiment_id / run.info.run_id / "artifacts"
        assert (stored / "samples.json").is_file()
        ran_in = [folder for folder in folders if (folder / "runs" / run.info.run_id).is_dir()]
        assert len(ran_in) == 1, f"run {run.info.run_id} is in {ran_in}"
    for folder in folders:  # no client kept an MLflow store of its own
        assert not {"mlruns", "mlartifacts", "mlflow.db"} & {p.name for p in folder.iterdir()}
    code, out = load["sweep"]
    assert code == 0, out[-3000:]
    study = optuna.load_study(study_name="team-load-sweep", storage=team.stack.database_url("optuna"))
    assert len(study.trials) == SWEEP_TRIALS
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)


def test_a_killed_sweep_leaves_no_trial_running_and_runs_again_to_continue_its_study(team: Team) -> None:
    storage, name = team.stack.database_url("optuna"), "team-killed-sweep"

    def running() -> list[Any]:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # not created yet
            return []
        states = optuna.trial.TrialState.RUNNING
        return [t for t in study.get_trials(deepcopy=False, states=(states,)) if "deeprnn.owner" in t.user_attrs]

    machine = team.machine("sweep-killed")
    proc = team.start("sweep-killed", machine, *sweep_args(team.url, name, 3))
    orphans = until("a trial running", running)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = len(optuna.load_study(study_name=name, storage=storage).trials)
    started = time.monotonic()
    code, out = team.finish(team.start("sweep-again", machine, *sweep_args(team.url, name, 1)))
    team.seconds["sweep run again after SIGKILL"] = time.monotonic() - started
    assert code == 0, out[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert all(states[t.number] == optuna.trial.TrialState.FAIL for t in orphans), states
    assert optuna.trial.TrialState.RUNNING not in states.values(), states
    assert len(study.trials) == before + 1 and study.trials[-1].state == optuna.trial.TrialState.COMPLETE


def test_no_log_of_the_stack_shows_a_locked_database_or_an_exhausted_pool(team: Team) -> None:
    logs = [*sorted((team.stack.root / "logs").glob("*.log")), Path(team.stack.pg_folder) / "postgres.log"]
    assert len(logs) >= 6
    for log in logs:
        text = log.read_text(errors="replace")
        for error in POOL_ERRORS:
            assert error not in text, f"{log.name}: {error!r}"
    print("team figures (s):", {k: round(v, 1) for k, v in team.seconds.items()})


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
