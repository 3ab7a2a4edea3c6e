"""Adaptive sweeps (``--search optuna``) on real Dask clusters under Prefect's harness, tracked in a real
sqlite MLflow store, the study in a real journal file: a trial falling behind is pruned early (its run KILLED,
tagged, its curve kept), the parent run carries the study's best and its pictures, a second sweep of the same
study adds trials side by side without running the first ones again; bad input is refused up front."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from corpora import CORPUS_MODEL
from corpora import CORPUS_SHA1 as BOOK_SHA1
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from deeprnn.cli.app import app
from deeprnn.flows.sweep_flow import sweep_lm
from deeprnn.ops.cluster import dask_task_runner

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 60
# SGD at lr 0.01 barely moves in 60 steps; at lr 2 the model learns: the first trial of each that runs after a
# finished lr-2 trial falls behind at the pruner's first rung. Seed 1 draws both in the first three trials.
SPACE = {"train.lr": [2.0, 0.01]}
TRAIN = {"device": "cpu", "max_steps": MAX_STEPS, "eval_every_steps": 10, "epochs": 100}


@pytest.fixture
def worker_env(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Dask workers are new processes that inherit this environment: make them import this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    return workdir


def _children(client: MlflowClient, parent_run_id: str) -> list[Any]:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _sweep(book_url: str, storage: Path, trials: int, workers: int) -> Any:
    return sweep_lm.with_options(task_runner=dask_task_runner(workers=workers, use_gpus=False))(
        space=SPACE,
        search="optuna",
        preset="smoke",
        data={"url": book_url, "sha1": BOOK_SHA1, "val_fraction": 0.1},
        model={"num_hiddens": 16},
        train=TRAIN,
        max_trials=trials,
        pruner="asha",
        seed=1,
        study="lr-study",
        storage=str(storage),
        experiment="study-check",
    )


def test_study_prunes_a_lagging_trial_and_continues_with_parallel_trials(
    worker_env: Path, cli_env: dict[str, str], book_url: str
) -> None:
    storage = worker_env / "studies.journal"
    first = _sweep(book_url, storage, trials=3, workers=1)
    client = MlflowClient()
    children = {int(c.data.tags["deeprnn.trial"]): c for c in _children(client, first.parent_run_id)}
    assert sorted(children) == [0, 1, 2]
    pruned = [c for c in children.values() if c.info.status == "KILLED"]
    finished = [c for c in children.values() if c.info.status == "FINISHED"]
    assert pruned and finished and len(pruned) + len(finished) == 3
    assert (first.trials_pruned, first.trials_finished) == (len(pruned), len(finished))
    for run in pruned:  # stopped early, said where and why, its curve kept up to there
        assert run.data.params["train.lr"] == "0.01"
        step = int(run.data.tags["deeprnn.pruned_at_step"])
        assert step < MAX_STEPS and run.data.tags["deeprnn.stop_reason"] == "pruned"
        assert "SuccessiveHalvingPruner" in run.data.tags["deeprnn.stop_detail"]
        curve = client.get_metric_history(run.info.run_id, "step_heldout_perplexity")
        assert curve and max(m.step for m in curve) == step
    for run in finished:
        assert run.data.metrics["steps_done"] == MAX_STEPS
    from prefect.artifacts import Artifact

    progress = Artifact.get("deeprnn-sweep-progress")  # the study's progress, as of its last trial
    assert progress is not None and "3 of 3 trials done" in progress.data
    assert f"pruned: {len(pruned)}" in progress.data and "best so far: trial" in progress.data

    # The parent run: the study's best trial, value and params, Optuna's pictures, the best model registered.
    parent = client.get_run(first.parent_run_id)
    best = min(finished, key=lambda r: r.data.metrics["val_perplexity"])
    assert parent.data.tags["deeprnn.study.best_run_id"] == best.info.run_id
    assert parent.data.tags["deeprnn.study.best.train.lr"] == "2.0"
    assert parent.data.metrics["study_best_value"] == pytest.approx(best.data.metrics["val_perplexity"])
    assert parent.data.metrics["trials_pruned"] == len(pruned)
    pictures = {a.path for a in client.list_artifacts(first.parent_run_id, "study")}
    expected = {"optimization_history.png", "param_importances.png", "intermediate_values.png"}
    assert pictures == {f"study/{name}" for name in expected}
    assert parent.data.tags["best_trial_run_id"] == best.info.run_id
    assert [v.run_id for v in client.search_model_versions(f"name='{CORPUS_MODEL}'")] == [best.info.run_id]

    # The same sweep again, from the command line: two more trials side by side on two workers, the study
    # continued (the same search, given as options), the first three trials not run again.
    before = {t.number: (t.state, t.value) for t in _study(storage).trials}
    out = worker_env / "second.json"
    args = ["--lr", "2.0,0.01", "--param", "model.num_hiddens=16", "--param", "data.val_fraction=0.1"]
    args += ["--param", f"train.max_steps={MAX_STEPS}", "--param", "train.eval_every_steps=10", "--epochs", "100"]
    args += ["--device", "cpu", "--data-url", book_url, "--data-sha1", BOOK_SHA1, "--seed", "1"]
    args += ["--study", "lr-study", "--storage", str(storage), "--experiment", "study-check", "--no-register-best"]
    command = [sys.executable, "-m", "deeprnn.cli.app", "sweep", "--search", "optuna", "--preset", "smoke", *args]
    command += ["--max-trials", "2", "--workers", "2", "--json", str(out)]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**cli_env, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the study holds 5 finished trials" in " ".join(proc.stdout.split())
    second = json.loads(out.read_text())
    study = _study(storage)
    assert {t.number: (t.state, t.value) for t in study.trials[:3]} == before
    assert len(study.trials) == 5 and second["study_trials"] == 5
    new = _children(client, second["parent_run_id"])
    assert sorted(int(c.data.tags["deeprnn.trial"]) for c in new) == [3, 4]
    assert len({c.data.tags["deeprnn.pid"] for c in new}) == 2
    assert new[0].info.start_time < new[1].info.end_time and new[1].info.start_time < new[0].info.end_time


def _journal(path: Path) -> Any:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def test_cli_adaptive_sweep_refuses_bad_input_before_any_trial(cli_env: dict[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    journal = str(tmp_path / "studies.journal")
    base = ["sweep", "--search", "optuna", "--preset", "smoke", "--storage", journal]
    cases = [
        (["--lr", "0.5,1", "--pruner", "hyperband"], "unknown pruner 'hyperband'; choose one of: asha, median, none"),
        (["--lr", "0.5,1", "--sampler", "cmaes"], "unknown sampler 'cmaes'; choose one of: tpe"),
        (["--param", "train.lr=1"], "nothing to search"),
        (["--param", "train.lr=0.5,1", "--param", "train.batch_size=8,100000"], "batch_size"),
        (["--space", str(_space(tmp_path, "lr: {low: 0, high: 1, log: true}"))], "a log range needs low > 0"),
        (["--space", str(_space(tmp_path, "lr: {low: 1, high: 1}"))], "holds one value"),
        (["--lr", "0.5,1", "--storage", f"sqlite:///{tmp_path}/missing/studies.db"], "cannot open the study storage"),
        (["--lr", "0.5,1", "--storage", str(tmp_path / "missing" / "s.journal")], "does not exist"),
    ]
    for args, message in cases:
        outcome = runner.invoke(app, [*base, *args])
        assert outcome.exit_code == 2, (args, outcome.output)
        assert message in " ".join(outcome.output.split()), (args, outcome.output)
        assert "Traceback" not in outcome.output
    # A study of that name running another search is not continued with this one.
    optuna.create_study(study_name="taken", storage=_journal(Path(journal))).set_user_attr("deeprnn.search", "{}")
    outcome = runner.invoke(app, [*base, "--lr", "0.5,1", "--study", "taken"])
    assert outcome.exit_code == 2 and "holds trials of another search" in " ".join(outcome.output.split())
    # A journal damaged before its last line (a record appended onto one a crash cut short): one line naming
    # the file and what to do, the file left as it was.
    damaged = tmp_path / "damaged.journal"
    damaged.write_bytes(Path(journal).read_bytes()[:-20] + b'{"op_code":0,"study_name":"x"}\n{"op_code":3}\n')
    before = damaged.read_bytes()
    outcome = runner.invoke(app, [*base, "--lr", "0.5,1", "--storage", str(damaged)])
    said = " ".join(outcome.output.split())
    assert outcome.exit_code == 2 and f"the study journal {damaged} is damaged: line" in said, outcome.output
    assert "KEPT.journal" in said and "Traceback" not in outcome.output and damaged.read_bytes() == before
    assert not Path(cli_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).exists()


def _space(folder: Path, text: str) -> Path:
    path = folder / f"space-{abs(hash(text))}.yaml"
    path.write_text(text + "\n")
    return path


def _cli_sweep(book_url: str, storage: Path, study: str, trials: int) -> list[str]:
    """The ``deeprnn sweep --search optuna`` command of a lean study on one worker: lr 2 or 0.5, each trial
    6 seconds of training, evaluated every 10 steps, no pruner."""
    args = ["--lr", "2.0,0.5", "--param", "model.num_hiddens=16", "--param", "train.time_budget=6"]
    args += ["--param", "train.eval_every_steps=10", "--param", "data.val_fraction=0.1", "--epochs", "1000"]
    args += ["--device", "cpu", "--pruner", "none", "--data-url", book_url, "--data-sha1", BOOK_SHA1]
    args += ["--study", study, "--storage", str(storage), "--experiment", "study-orphans", "--no-register-best"]
    args += ["--max-trials", str(trials), "--workers", "1"]
    return [sys.executable, "-m", "deeprnn.cli.app", "sweep", "--search", "optuna", "--preset", "smoke", *args]


def _stop_mid_trial(command: list[str], env: dict[str, str], storage: Path, study: str, sig: signal.Signals) -> str:
    """Start the sweep in a process group of its own and, as soon as a trial has reported a held-out value,
    send ``sig`` to the whole group (a terminal's Ctrl-C, or SIGKILL); returns the command's output."""
    before = len(_study(storage, study).trials) if storage.exists() else 0
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and not _reported(storage, study, before):
            time.sleep(0.2)
        assert proc.poll() is None and _reported(storage, study, before), "no new trial reported before the end"
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if sig == signal.SIGINT:  # the command's own clean stop
        assert proc.returncode == 130, out[-3000:]
    return out


def _reported(storage: Path, name: str, after: int) -> bool:
    """Whether a trial numbered ``after`` or later is running and has reported a held-out value."""
    if not storage.exists():
        return False
    try:
        trials = _study(storage, name).trials
    except KeyError:  # the study is not created yet
        return False
    return any(t.state.name == "RUNNING" and t.intermediate_values for t in trials[after:])


def test_a_sweep_stopped_mid_trial_leaves_no_running_trial_once_the_next_one_starts(
    worker_env: Path, cli_env: dict[str, str], book_url: str
) -> None:
    storage, name = worker_env / "orphans.journal", "orphans"
    env = {**cli_env, "PYTHONPATH": str(REPO)}
    command = _cli_sweep(book_url, storage, name, trials=1)
    _stop_mid_trial(command, env, storage, name, signal.SIGINT)  # Ctrl-C
    # Unless the stop let the worker end it, the trial stays RUNNING: nothing ends a torn-down worker's trial.
    assert [t.state.name for t in _study(storage, name).trials] in (["RUNNING"], ["FAIL"])
    _stop_mid_trial(command, env, storage, name, signal.SIGKILL)  # the next sweep, killed outright
    assert [t.state.name for t in _study(storage, name).trials] == ["FAIL", "RUNNING"]  # it failed trial 0 first

    # The same sweep again, to its end: the killed sweep's trial failed too, one more trial finished.
    out_json = worker_env / "third.json"
    started = time.monotonic()
    proc = subprocess.run([*command, "--json", str(out_json)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "trial 1 of study 'orphans' was left RUNNING: marked FAIL (process gone: pid" in said, said[-3000:]
    assert "the study holds 3 finished trials" in said, said[-2000:]
    study = _study(storage, name)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE"]
    assert all(t.user_attrs["deeprnn.fail_reason"].startswith("process gone") for t in study.trials[:2])
    assert json.loads(out_json.read_text())["study_trials"] == 3
    # MLflow and the study agree: the child runs FAILED are the trials failed in the study.
    client = MlflowClient()
    experiment = client.get_experiment_by_name("study-orphans")
    children = client.search_runs([experiment.experiment_id], "tags.`deeprnn.search.optuna_study` = 'orphans'")
    status = {int(c.data.tags["deeprnn.trial"]): c.info.status for c in children}
    assert status[1] == "FAILED" and status[2] == "FINISHED"  # the run of the killed sweep's trial: FAILED
    assert status[0] in ("FAILED", "KILLED")  # FAILED as an orphan, or KILLED by a stop that reached it
    print(f"the third sweep took {time.monotonic() - started:.1f} s")


def _study(path: Path, name: str = "lr-study") -> Any:
    return optuna.load_study(study_name=name, storage=_journal(path))
