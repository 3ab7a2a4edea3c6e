"""Faults produced for real on `deeprnn run` processes: SIGKILL then --resume, Ctrl-C, four runs at once on a
fresh store and cache. Every process talks to the harness's Prefect API
and downloads the corpus, with credentials in its URL, from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from corpora import CORPUS_MODEL
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from deeprnn.training import checkpoint

pytestmark = pytest.mark.e2e

EPOCHS = 8
SECRET = "s3cr3t-pw"
REPO = Path(__file__).resolve().parents[2]


def _smoke_args(url: str, epochs: int = EPOCHS) -> list[str]:
    """One configuration for every process here, so their results can be compared bit for bit."""
    # A small held-out part keeps the evaluation after every epoch cheap.
    return [
        "--preset",
        "smoke",
        "--device",
        "cpu",
        "--epochs",
        str(epochs),
        "--checkpoint-every",
        "1",
        "--test-fraction",
        "0.02",
        "--data-url",
        url,
        "--data-sha1",
        BOOK_SHA1,
        "--num-tokens",
        "10",
    ]


@dataclass
class Machine:
    """A fresh machine: its own working folder, sqlite MLflow store (not yet created) and empty cache."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    logs: dict[int, Path] = field(default_factory=dict)  # process id -> its output

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def start(self, *args: str) -> subprocess.Popen:
        """Start ``python -m deeprnn.cli.app ARGS`` here, in a process of its own (signals reach only it)."""
        # Output goes to a file, not a pipe: nobody reads it while the process runs, and a full pipe would block.
        log = self.root / f"cli-{time.monotonic_ns()}.log"
        with open(log, "w", encoding="utf-8") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "deeprnn.cli.app", *args],
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs[proc.pid] = log
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
        """Wait for ``proc``; its exit code and everything it printed."""
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        return code, self.logs[proc.pid].read_text(encoding="utf-8", errors="replace")

    def run(self, *args: str, timeout: float = 300) -> tuple[int, str]:
        """Run ``python -m deeprnn.cli.app ARGS`` to its end."""
        return self.finish(self.start(*args), timeout)


def _machine(root: Path, prefect_api: str) -> Machine:
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        PREFECT_API_URL=prefect_api,
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
        DEEPRNN_CACHE_DIR=str(root / "cache"),
        # Deterministic CPU arithmetic: one thread, so results do not depend on how work is split.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return Machine(root, env)


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen, timeout: float = 240) -> Path:
    """Poll until a file matching ``pattern`` exists under ``folder``; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before writing {pattern}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {folder} after {timeout} s")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["model_state"]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _prefect_logs(flow_run_id: str) -> str:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


@pytest.fixture(scope="module")
def secret_url(fault_server) -> str:
    """The corpus URL with a user name and password in it."""
    return fault_server.url("/private/timemachine.txt").replace("http://", f"http://reader:{SECRET}@")


# ----- four runs at once on a fresh machine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def four_at_once(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, secret_url: str) -> dict[str, Any]:
    """Four identical runs started together on a fresh store and an empty cache: the uninterrupted reference
    for the resume test, and the concurrency test itself."""
    machine = _machine(tmp_path_factory.mktemp("four") / "machine", prefect_api)
    procs = [machine.start("run", *_smoke_args(secret_url), "--json", f"result-{i}.json") for i in range(4)]
    outputs = [machine.finish(p, timeout=400) for p in procs]
    results = [
        json.loads((machine.root / f"result-{i}.json").read_text()) if code == 0 else None
        for i, (code, _) in enumerate(outputs)
    ]
    return {"machine": machine, "outputs": outputs, "results": results}


def test_four_runs_at_once_on_a_fresh_store_and_cache_all_succeed(four_at_once: dict[str, Any]) -> None:
    machine: Machine = four_at_once["machine"]
    for code, out in four_at_once["outputs"]:
        assert code == 0, out[-3000:]
    results = four_at_once["results"]
    run_ids = {r["run_id"] for r in results}
    assert len(run_ids) == 4
    client = machine.client
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [s for s, _ in _history(client, run_id, "train_perplexity")] == list(range(1, EPOCHS + 1))
        assert run.data.tags["dataset.sha1"] == BOOK_SHA1
    # Uncorrupted: the same seed and settings gave the same weights in every process, and each logged model's
    # samples are those of the others.
    reference = _weights(Path(results[0]["checkpoint"]))
    for result in results[1:]:
        got = _weights(Path(result["checkpoint"]))
        assert all(torch.equal(got[k], v) for k, v in reference.items())
        assert result["samples"] == results[0]["samples"]
    # One download, shared: a single verified copy in the cache and no partial files left behind; and one
    # token cache entry, tokenized once under its lock (its lock file beside it).
    cache = machine.root / "cache"
    assert sorted(p.name for p in cache.iterdir()) == [f"{BOOK_SHA1}.sha1", f"{BOOK_SHA1}.txt", "tokens"]
    entries = sorted((cache / "tokens").iterdir())
    assert [p.suffix for p in entries] == ["", ".lock"] and (entries[0] / "ids.bin").is_file()
    # All four models registered, as four distinct versions.
    versions = client.search_model_versions(f"name='{CORPUS_MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert {v.run_id for v in versions} == run_ids


def test_url_credentials_appear_in_no_param_tag_artifact_or_log(four_at_once: dict[str, Any]) -> None:
    machine: Machine = four_at_once["machine"]
    client = machine.client
    for (_code, out), result in zip(four_at_once["outputs"], four_at_once["results"]):
        assert SECRET not in out  # what the CLI printed, Prefect's log lines included
        run = client.get_run(result["run_id"])
        assert run.data.params["data.url"].startswith("http://127.0.0.1:")
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if SECRET in v]
        config = json.loads(
            Path(client.download_artifacts(run.info.run_id, "config.json", str(machine.root))).read_text()
        )
        assert SECRET not in json.dumps(config)
        assert SECRET not in json.dumps(checkpoint.load(Path(result["checkpoint"]))["config"])
        logs = _prefect_logs(run.data.tags["prefect.flow_run_id"])
        assert "MLflow run" in logs and SECRET not in logs


# ----- SIGKILL, then --resume ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, secret_url: str) -> dict[str, Any]:
    """A run killed with SIGKILL once it has a checkpoint, then resumed with `deeprnn run --resume RUN_ID`."""
    machine = _machine(tmp_path_factory.mktemp("killed") / "machine", prefect_api)
    proc = machine.start("run", *_smoke_args(secret_url))
    last = _wait_for("runs/*/last.pt", machine.root, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    code, killed_out = machine.finish(proc)
    run_id = last.parent.name
    killed_at = checkpoint.load(last)["epoch"]
    status_after_kill = machine.client.get_run(run_id).info.status
    logged_after_kill = [s for s, _ in _history(machine.client, run_id, "train_perplexity")]
    # The next deeprnn command on this host that starts a flow (here one that fails on its corpus's SHA-1)
    # marks the run FAILED; a command refused on its options alone starts nothing and looks at no run.
    next_code, next_out = machine.run(
        "run",
        "--preset",
        "smoke",
        "--device",
        "cpu",
        "--data-url",
        secret_url,
        "--data-sha1",
        "0" * 40,
        "--experiment",
        "next-command",
    )
    after_next = machine.client.get_run(run_id)
    code_resumed, resumed_out = machine.run("run", "--resume", run_id, "--json", "resumed.json")
    return {
        "machine": machine,
        "run_id": run_id,
        "kill_code": code,
        "killed_at": killed_at,
        "status_after_kill": status_after_kill,
        "logged_after_kill": logged_after_kill,
        "next_code": next_code,
        "next_out": next_out,
        "after_next": after_next,
        "code": code_resumed,
        "out": resumed_out,
        "result": json.loads((machine.root / "resumed.json").read_text()) if code_resumed == 0 else None,
    }


def test_resume_after_sigkill_finishes_the_same_run_with_one_continuous_curve(
    killed_then_resumed: dict[str, Any],
) -> None:
    k = killed_then_resumed
    assert k["kill_code"] == -signal.SIGKILL
    assert 1 <= k["killed_at"] < EPOCHS, "killed too late to test anything"
    assert k["status_after_kill"] == "RUNNING"  # SIGKILL gives no chance to say otherwise ...
    # ... but the next command on the same host sees that the run's process is gone and marks it FAILED.
    assert k["after_next"].info.status == "FAILED"
    reason = k["after_next"].data.tags["deeprnn.failure_reason"]
    assert reason.startswith("process gone: pid ") and "killed or crashed" in reason
    assert f"MLflow run {k['run_id']} was left RUNNING" in k["next_out"] and f"--resume {k['run_id']}" in k["next_out"]
    assert k["next_code"] == 1 and "sha1 mismatch" in k["next_out"]
    assert "Traceback" not in k["next_out"]
    assert k["code"] == 0, k["out"][-3000:]
    result, client = k["result"], k["machine"].client
    assert result["run_id"] == k["run_id"]  # the same MLflow run, not a new one
    assert "resuming from the checkpoint at epoch" in k["out"]
    run = client.get_run(k["run_id"])
    assert run.info.status == "FINISHED"
    assert "deeprnn.failure_reason" not in run.data.tags  # resumed and finished: no longer a failure
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.tags["deeprnn.resumed_at_epoch"] == str(k["killed_at"])
    # Epochs logged before the kill stay as they were; the resumed run logged only the ones after them.
    assert k["logged_after_kill"] == list(range(1, len(k["logged_after_kill"]) + 1))
    assert len(k["logged_after_kill"]) >= k["killed_at"]
    for key in ("train_perplexity", "heldout_perplexity", "lr"):
        assert [s for s, _ in _history(client, k["run_id"], key)] == list(range(1, EPOCHS + 1)), key
    assert checkpoint.load(Path(result["checkpoint"]))["epoch"] == EPOCHS
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # This machine's own cache holds the corpus (another machine's copy, cached by Prefect, was not reused).
    assert (k["machine"].root / "cache" / f"{BOOK_SHA1}.txt").is_file()


def test_resumed_weights_and_curve_equal_an_uninterrupted_run_bit_for_bit(
    killed_then_resumed: dict[str, Any], four_at_once: dict[str, Any]
) -> None:
    assert killed_then_resumed["code"] == 0 and four_at_once["results"][0] is not None
    resumed = _weights(Path(killed_then_resumed["result"]["checkpoint"]))
    straight = _weights(Path(four_at_once["results"][0]["checkpoint"]))
    assert resumed.keys() == straight.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    # The curve too: the epochs trained before the kill and after the resume are the uninterrupted run's.
    a = _history(killed_then_resumed["machine"].client, killed_then_resumed["run_id"], "train_perplexity")
    b = _history(four_at_once["machine"].client, four_at_once["results"][0]["run_id"], "train_perplexity")
    assert a == b
    assert killed_then_resumed["result"]["samples"] == four_at_once["results"][0]["samples"]


# ----- Ctrl-C -------------------------------------------------------------------------------------------


def test_ctrl_c_during_training_marks_the_run_killed_and_keeps_the_checkpoint(
    tmp_path: Path, prefect_api: str, secret_url: str
) -> None:
    machine = _machine(tmp_path / "machine", prefect_api)
    epochs = 40  # long enough that the interrupt lands in training
    proc = machine.start("run", *_smoke_args(secret_url, epochs))
    last = _wait_for("runs/*/last.pt", machine.root, proc)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = machine.finish(proc, timeout=120)
    assert code == 130, out[-3000:]
    assert "interrupted" in out and "--resume" in out
    run = machine.client.get_run(last.parent.name)
    assert run.info.status in ("KILLED", "FAILED")
    saved = checkpoint.load(last)
    assert 1 <= saved["epoch"] < epochs
    assert saved["trainer_state"] is not None  # resumable


@pytest.fixture
def store_with_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[MlflowClient, str, list[int]]]:
    """A sqlite store with one run, and a switch: append to the list, and the next SELECT that MLflow runs
    is hit by a real Ctrl-C (SIGINT to this process) while its rows are still to be read."""
    from mlflow.entities import Metric
    from sqlalchemy import event

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("interrupted")).info.run_id
    client.log_batch(run_id, metrics=[Metric("m", float(i), 0, i) for i in range(500)])
    engine = client._tracking_client.store.engine
    armed: list[int] = []

    def ctrl_c(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed and statement.lstrip().upper().startswith("SELECT"):
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(engine, "after_cursor_execute", ctrl_c)
    # Python's own Ctrl-C, even where the test process started with SIGINT ignored (as a shell starts a
    # command it runs in the background): the signal must raise KeyboardInterrupt here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield client, run_id, armed
    signal.signal(signal.SIGINT, previous)
    event.remove(engine, "after_cursor_execute", ctrl_c)


def test_ctrl_c_in_the_middle_of_an_mlflow_read_still_ends_the_run_killed_at_once(
    store_with_a_run: tuple[MlflowClient, str, list[int]],
) -> None:
    """SQLAlchemy drops its connection when Ctrl-C lands mid-read, and the half-read cursor, held by the
    unwound frames, keeps sqlite's lock: the run must still be marked KILLED at once, not fail after sqlite's
    20 s lock timeout with "database is locked" (seen when the signal hit `get_run` during training)."""
    import deeprnn.tracking.runs

    client, run_id, armed = store_with_a_run
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with deeprnn.tracking.runs.run_status(run_id):
            armed.append(1)
            client.get_run(run_id)
    assert client.get_run(run_id).info.status == "KILLED"
    assert time.monotonic() - started < 10


def test_ctrl_c_is_held_back_until_the_mlflow_calls_of_a_training_callback_finish(
    store_with_a_run: tuple[MlflowClient, str, list[int]],
) -> None:
    import deeprnn.tracking.runs

    client, run_id, armed = store_with_a_run
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with deeprnn.tracking.runs.uninterrupted():
            armed.append(1)
            finished.append(client.get_run(run_id).info.run_id)  # the read completes despite the signal
    assert finished == [run_id]
    client.set_terminated(run_id, "KILLED")  # and the store is free at once
    assert client.get_run(run_id).info.status == "KILLED"
