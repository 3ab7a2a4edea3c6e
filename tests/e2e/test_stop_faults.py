"""Stopping `deeprnn run` (and `deeprnn sweep`) for real, as a terminal, `timeout`, `docker stop` or systemd do:
SIGINT or SIGTERM to the command's whole process group, with Prefect's temporary API server (not the
harness's) so that the server must outlive the flow run's last report; then damaged and missing checkpoints on
`--resume`."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from test_faults import Machine, _machine, _smoke_args

from deeprnn.cli.sweep import SWEEP_STOP_SECONDS
from deeprnn.ops.prefect_api import QUIET_SERVER_ENV
from deeprnn.training import checkpoint

pytestmark = pytest.mark.e2e

STOP_SECONDS = 10  # from the signal to the command's exit


def _own_api(machine: Machine) -> Machine:
    """The machine without the harness's API: each command starts Prefect's temporary server on its database."""
    machine.env.pop("PREFECT_API_URL", None)
    machine.env.update(PREFECT_HOME=str(machine.root / "prefect"), **QUIET_SERVER_ENV)
    return machine


def _api_servers(proc: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]


def _stop(machine: Machine, proc: subprocess.Popen, *signals: int) -> tuple[int, str, float, list[psutil.Process]]:
    """Send ``signals`` to the command's process group; its exit code, output, seconds from the first signal
    to its exit, and its API server processes (ended or not)."""
    servers = _api_servers(proc)
    sent = time.monotonic()
    for signum in signals:
        os.killpg(proc.pid, signum)
        time.sleep(0.3)
    code, out = machine.finish(proc, timeout=60)
    return code, out, time.monotonic() - sent, servers


def _wait_in_log(machine: Machine, proc: subprocess.Popen, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in machine.logs[proc.pid].read_text(encoding="utf-8", errors="replace"):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before printing {text!r}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s"
        time.sleep(0.05)


def _wait_for_hit(server: Any, prefix: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not server.count(prefix):
        assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)


def _flow_run_states(machine: Machine, flow_run_ids: list[str]) -> dict[str, Any]:
    """Each flow run's state type, and those of its task runs by name, as the machine's own Prefect database
    holds them once its temporary API server is gone: ``{id: state, (id, task run name): state}``. Read from
    the file (the API would serve these same rows; a Prefect server started only to read them added its start-up to the
    fixture)."""
    states: dict[Any, str] = {}
    with sqlite3.connect(machine.root / "prefect" / "prefect.db") as db:
        for i in flow_run_ids:
            (states[i],) = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (i,)).fetchone()
            for name, state in db.execute("SELECT name, state_type FROM task_run WHERE flow_run_id = ?", (i,)):
                states[i, name] = state
    return states


def _flip_exponent_bit(path: Path) -> float:
    """Flip the highest exponent bit of one weight in the file (a huge finite value, not NaN); returns it."""
    weights = next(iter(checkpoint.load(path)["model_state"].values())).flatten()
    raw = bytearray(path.read_bytes())
    at = raw.find(weights[:2].numpy().tobytes())
    assert at > 0
    raw[at + 3] ^= 0x40  # little-endian float32: the last byte holds the sign and the upper exponent bits
    path.write_bytes(bytes(raw))
    return float(struct.unpack("<f", bytes(raw[at : at + 4]))[0])


def _assert_clean_stop(code: int, out: str, seconds: float, servers: list[psutil.Process], exit_code: int) -> None:
    assert code == exit_code, out[-3000:]
    assert seconds < STOP_SECONDS, f"stopped {seconds:.1f} s after the signal"
    assert "Traceback" not in out and "ConnectError" not in out and "Error logging to API" not in out, out[-3000:]
    assert out.count("interrupted by ") == 1, out[-3000:]
    assert servers, "no temporary Prefect API server was started"
    gone, alive = psutil.wait_procs(servers, timeout=10)
    assert not alive, "the temporary Prefect API server outlived its command"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, fault_server: Any) -> dict[str, Any]:
    """One machine: a run stopped in training by SIGINT to its group, its checkpoint damaged and resumed; a run
    stopped by SIGTERM during its download, then resumed; a run stopped twice at once."""
    machine = _own_api(_machine(tmp_path_factory.mktemp("stop") / "machine", prefect_api))
    book = fault_server.url("/stop/timemachine.txt")
    seen: dict[str, Any] = {"machine": machine}
    # SIGINT in training: no --checkpoint-every, so the only checkpoint is the one the stop writes.
    args = [a for a in _smoke_args(book, epochs=300) if a not in ("--checkpoint-every", "1")]
    proc = machine.start("run", *args)
    _wait_in_log(machine, proc, "epoch 3/300")
    seen["train"] = _stop(machine, proc, signal.SIGINT)
    (last,) = machine.root.glob("runs/*/last.pt")
    seen["last"], seen["saved_epoch"] = last, checkpoint.load(last)["epoch"]
    seen["after_stop"] = machine.client.get_run(last.parent.name)
    seen["flipped_to"] = _flip_exponent_bit(last)
    seen["resumed"] = machine.run("run", "--resume", last.parent.name, "--epochs", str(seen["saved_epoch"] + 2))
    # SIGTERM while the corpus downloads (an empty cache: else the cached copy is used): the MLflow run is
    # open, nothing trained yet.
    machine.env["DEEPRNN_CACHE_DIR"] = str(machine.root / "empty-cache-1")
    proc = machine.start("run", *_smoke_args(fault_server.url("/stall/term/timemachine.txt")))
    _wait_for_hit(fault_server, "/stall/term/", proc)
    seen["download"] = _stop(machine, proc, signal.SIGTERM)
    # Ctrl-C twice: the second one ends the command at once.
    machine.env["DEEPRNN_CACHE_DIR"] = str(machine.root / "empty-cache-2")
    proc = machine.start("run", *_smoke_args(fault_server.url("/stall/twice/timemachine.txt")))
    _wait_for_hit(fault_server, "/stall/twice/", proc)
    seen["twice"] = _stop(machine, proc, signal.SIGINT, signal.SIGINT)
    seen["flow_run_states"] = _flow_run_states(machine, [seen["after_stop"].data.tags["prefect.flow_run_id"]])
    return seen


def test_sigint_to_the_group_in_training_checkpoints_marks_killed_and_exits_130(stopped: dict[str, Any]) -> None:
    code, out, seconds, servers = stopped["train"]
    _assert_clean_stop(code, out, seconds, servers, 130)
    run_id = stopped["last"].parent.name
    assert f"interrupted by SIGINT: MLflow run {run_id} is marked KILLED" in out
    assert f"continue with deeprnn run --resume {run_id}" in out and "RUN_ID" not in out
    assert stopped["saved_epoch"] >= 3 and checkpoint.digest_path(stopped["last"]).is_file()
    run = stopped["after_stop"]
    assert run.info.status == "KILLED"
    assert run.data.tags["deeprnn.stopped"] == f"continue with: deeprnn run --resume {run_id}"
    # The flow run reported how it ended before its API server went away (it was left RUNNING before).
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    states = stopped["flow_run_states"]
    assert states[flow_run_id] == "CANCELLED"
    # The task run that the stop ended is Cancelled with it, not Crashed; those before it completed.
    tasks = {key[1]: state for key, state in states.items() if isinstance(key, tuple) and key[0] == flow_run_id}
    assert [state for name, state in tasks.items() if name.startswith("train-model")] == ["CANCELLED"], tasks
    assert set(tasks.values()) == {"COMPLETED", "CANCELLED"}, tasks


def test_a_damaged_checkpoint_is_named_and_the_mlflow_copy_resumes_the_run(stopped: dict[str, Any]) -> None:
    code, out = stopped["resumed"]
    last: Path = stopped["last"]
    assert abs(stopped["flipped_to"]) > 1e30  # the damage: one bit, a finite but absurd weight
    assert code == 0, out[-3000:]
    assert f"checkpoint {last} is damaged" in out and "taking the MLflow copy (checkpoints/last.pt)" in out
    assert f"resuming from the checkpoint at epoch {stopped['saved_epoch']}" in out
    assert "Traceback" not in out
    machine: Machine = stopped["machine"]
    run = machine.client.get_run(last.parent.name)
    assert run.info.status == "FINISHED" and "deeprnn.stopped" not in run.data.tags
    # What MLflow holds now is sound: the resumed run uploaded only checkpoints that matched their digest.
    copy = Path(machine.client.download_artifacts(run.info.run_id, "checkpoints", str(machine.root / "copy")))
    saved = checkpoint.load(copy / "last.pt")
    assert saved["epoch"] == stopped["saved_epoch"] + 2
    assert max(float(v.abs().max()) for v in saved["model_state"].values()) < 1e3


def test_sigterm_to_the_group_during_the_download_offers_no_resume(stopped: dict[str, Any]) -> None:
    code, out, seconds, servers = stopped["download"]
    _assert_clean_stop(code, out, seconds, servers, 143)
    # The corpus comes before the MLflow run: stopped while fetching it, nothing was opened or trained.
    assert "interrupted by SIGTERM before the MLflow run was opened: nothing was trained or changed" in out
    assert "--resume" not in out


def test_resume_of_a_run_that_never_checkpointed_says_so_in_one_line(stopped: dict[str, Any]) -> None:
    machine: Machine = stopped["machine"]
    # A run stopped before its first checkpoint, as the store holds one: KILLED, no checkpoint anywhere.
    experiment = machine.client.create_experiment("no-checkpoint")
    run_id = machine.client.create_run(experiment).info.run_id
    machine.client.set_terminated(run_id, "KILLED")
    # Asked to resume anyway: one line, exit 1.
    code, out = machine.run("run", "--resume", run_id)
    assert code == 1, out[-3000:]
    assert out.count("error: ") == 1 and f"error: MLflow run {run_id} has no checkpoint to resume from" in out
    assert "Traceback" not in out


def test_a_second_ctrl_c_stops_at_once(stopped: dict[str, Any]) -> None:
    code, out, seconds, servers = stopped["twice"]
    assert code == 130, out[-3000:]
    assert seconds < 3, f"stopped {seconds:.1f} s after the first signal"
    assert "second stop signal (SIGINT); stopped at once" in out
    gone, alive = psutil.wait_procs(servers, timeout=10)
    assert servers and not alive, "the temporary Prefect API server outlived its command"  # parent-death signal


def test_sigterm_to_a_sweeps_group_marks_it_killed_stops_its_workers_and_exits_143(
    tmp_path_factory: pytest.TempPathFactory, prefect_api: str, book_url: str
) -> None:
    """`deeprnn sweep` stops as `deeprnn run` does: SIGTERM to its whole group (as `docker stop`, systemd) while
    its trials train on a local Dask cluster; one line, exit 143, no process of it left. Its trials reported to
    the command's temporary Prefect server."""
    machine = _own_api(_machine(tmp_path_factory.mktemp("sweep-stop") / "machine", prefect_api))
    machine.env["DEEPRNN_DASK_WORKERS"] = "2"
    args = ["--preset", "smoke", "--device", "cpu", "--epochs", "300", "--data-url", book_url, "--data-sha1", BOOK_SHA1]
    proc = machine.start("sweep", *args, "--num-hiddens", "8,16", "--no-register-best")
    _wait_in_log(machine, proc, "epoch 3/300")
    children = psutil.Process(proc.pid).children(recursive=True)  # Dask workers, the temporary API server
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children) and len(children) >= 3, children
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = machine.finish(proc, timeout=120)
    seconds = time.monotonic() - sent
    assert code == 143, out[-3000:]
    assert seconds < SWEEP_STOP_SECONDS, f"stopped {seconds:.1f} s after the signal"
    assert out.count("interrupted by ") == 1, out[-3000:]
    # No traceback of deeprnn's. Dask's own comm teardown may log one while its cluster closes under a stop
    # (CommClosedError, a cancelled heartbeat): tolerated here, and only that.
    dask_teardown = ("distributed", "CommClosedError", "CancelledError")
    tracebacks = out.split("Traceback (most recent call last):")[1:]
    assert all(any(mark in block for mark in dask_teardown) for block in tracebacks), out[-3000:]
    assert not re.search(r"/deeprnn/(cli|flows|tasks|ops|tracking|training|data|search)/", "".join(tracebacks)), out
    assert "interrupted by SIGTERM: the sweep's MLflow run is marked KILLED" in out, out[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"processes of the sweep outlived it: {alive}"
    experiment = machine.client.get_experiment_by_name("deeprnn-sweep")
    runs = machine.client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
    # The local Dask workers were handed the temporary server's URL: the sweep's flow run and the trials' task
    # runs are in the one database under PREFECT_HOME (both trials as a rule; the stop may come before a worker
    # that started late has reported its trial).
    with sqlite3.connect(machine.root / "prefect" / "prefect.db") as db:
        flows = [row[0] for row in db.execute("SELECT id FROM flow_run")]
        trials = db.execute("SELECT name, flow_run_id FROM task_run WHERE name LIKE 'trial-%'").fetchall()
    assert len(flows) == 1 and trials, (flows, trials)
    assert {name for name, _ in trials} <= {"trial-0", "trial-1"} and {run for _, run in trials} == set(flows)
