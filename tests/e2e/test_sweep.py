"""Sweeps on real Dask clusters (worker processes on 127.0.0.1) under Prefect's harness, tracked in a real
sqlite MLflow store: trials overlap, one fails honestly, the best is rolled up, the same sweep again runs only
what did not finish; the CLI on an existing cluster."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
from corpora import CORPUS_MODEL
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from deeprnn.cli.app import app
from deeprnn.flows.sweep_flow import sweep_lm
from deeprnn.ops.cluster import ClusterConfigError, dask_task_runner, gpu_request
from deeprnn.tasks.sweep_report import SweepFailedError

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker_env(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Dask workers are new processes that inherit this environment: make them import this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    return workdir


def _children(client: MlflowClient, parent_run_id: str) -> list[Any]:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")


def _journal(path: Path) -> Any:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


def _overlap(a: Any, b: Any) -> bool:
    return a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time


def test_sweep_runs_trials_side_by_side_and_survives_a_failing_trial(worker_env: Path, book_url: str) -> None:
    # 2 x 2 grid; only batch 31 x 64 steps fails, at run time: it needs 2,049 training tokens, smoke has 2,000.
    space = {"train.num_steps": [16, 64], "train.batch_size": [8, 31]}
    arguments: dict[str, Any] = dict(space=space, preset="smoke", data={"url": book_url, "sha1": BOOK_SHA1})
    arguments.update(model={"num_hiddens": 16}, train={"epochs": 2, "device": "cpu"}, experiment="sweep-check")
    result = sweep_lm.with_options(task_runner=dask_task_runner(workers=2, use_gpus=False))(**arguments)
    client = MlflowClient()
    parent_id = result.parent_run_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"

    # Four child runs under the one parent, one per trial, and nothing else in the experiment.
    children = _children(client, parent_id)
    assert sorted(c.data.tags["deeprnn.trial"] for c in children) == ["0", "1", "2", "3"]
    assert len({c.info.run_id for c in children}) == 4
    assert len(client.search_runs([parent.info.experiment_id])) == 5
    by_trial = {int(c.data.tags["deeprnn.trial"]): c for c in children}
    failed = by_trial[3]
    assert (failed.data.params["train.batch_size"], failed.data.params["train.num_steps"]) == ("31", "64")
    assert failed.info.status == "FAILED"
    assert all(by_trial[i].info.status == "FINISHED" for i in (0, 1, 2))

    # Reported as failed, with the reason, while the sweep reports how many succeeded.
    assert (result.trials_total, result.trials_finished, result.trials_failed) == (4, 3, 1)
    reported = {t.index: t for t in result.trials}
    assert reported[3].status == "FAILED" and reported[3].run_id == failed.info.run_id
    assert reported[3].error.startswith("CorpusTooShortError") and "2049" in reported[3].error

    # The trials really ran side by side: two worker processes (neither is this one), overlapping in time.
    pids = {c.data.tags["deeprnn.pid"] for c in children}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    overlapping = [(i, j) for i in by_trial for j in by_trial if i < j and _overlap(by_trial[i], by_trial[j])]
    assert overlapping, [(c.data.tags["deeprnn.trial"], c.info.start_time, c.info.end_time) for c in children]

    # Each finished trial is a full run: its params, per-epoch curves and a logged model.
    for i in (0, 1, 2):
        run = by_trial[i]
        assert run.data.params["model.num_hiddens"] == "16" and run.data.params["train.epochs"] == "2"
        history = client.get_metric_history(run.info.run_id, "train_perplexity")
        assert sorted(m.step for m in history) == [1, 2]
        assert run.data.metrics["test_perplexity"] > 1.0

    # The best trial (lowest held-out perplexity) is rolled up to the parent, and only its model registered.
    best = min((by_trial[i] for i in (0, 1, 2)), key=lambda r: r.data.metrics["test_perplexity"])
    assert parent.data.tags["best_trial_run_id"] == best.info.run_id == result.best.run_id
    assert parent.data.metrics["best_test_perplexity"] == pytest.approx(best.data.metrics["test_perplexity"])
    assert (parent.data.metrics["trials_finished"], parent.data.metrics["trials_failed"]) == (3, 1)
    assert json.loads(parent.data.params["train.batch_size"]) == [8, 31]  # the space, on the parent
    versions = client.search_model_versions(f"name='{CORPUS_MODEL}'")
    assert [v.run_id for v in versions] == [best.info.run_id]
    assert client.get_model_version_by_alias(CORPUS_MODEL, "champion").run_id == best.info.run_id

    # The summary table artifact: ranked by held-out perplexity, the failed trial last.
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent_id}/trials.csv"))))
    finished = sorted((by_trial[i] for i in (0, 1, 2)), key=lambda r: r.data.metrics["test_perplexity"])
    assert [r["run_id"] for r in rows] == [r.info.run_id for r in finished] + [failed.info.run_id]
    assert rows[-1]["status"] == "FAILED" and rows[-1]["error"].startswith("CorpusTooShortError")

    # And the Prefect summary artifact of this flow run, in the same order.
    from prefect.artifacts import Artifact

    artifact = Artifact.get("deeprnn-sweep-summary")
    assert artifact is not None and str(artifact.flow_run_id) == parent.data.tags["prefect.flow_run_id"]
    assert "3 of 4 trials finished" in artifact.data
    positions = [artifact.data.index(r.info.run_id) for r in finished + [failed]]
    assert positions == sorted(positions)

    # Every sweep is an Optuna study (in optuna.journal here): the same sweep again continues it, running only
    # the point that did not finish (it fails again), as trial 4 under a new parent run.
    with pytest.raises(SweepFailedError, match="all 1 trials failed; the first error: CorpusTooShortError"):
        sweep_lm.with_options(task_runner=dask_task_runner(workers=1, use_gpus=False))(**arguments)
    journal = _journal(worker_env / "optuna.journal")
    (name,) = optuna.get_all_study_names(journal)  # named after the experiment, the search and its digest
    assert name.startswith("sweep-check-grid-")
    study = optuna.load_study(study_name=name, storage=journal)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["FAIL", "FAIL"]
    assert study.trials[4].params == {"train.num_steps": 64, "train.batch_size": 31}
    (second,) = [r for r in client.search_runs([parent.info.experiment_id]) if r.info.run_id != parent_id and
                 "mlflow.parentRunId" not in r.data.tags]  # fmt: skip
    (retried,) = _children(client, second.info.run_id)
    assert retried.data.tags["deeprnn.trial"] == "4" and retried.data.params["train.batch_size"] == "31"
    assert second.info.status == "FAILED" and second.data.params["sweep.study_trials_before"] == "4"


def test_cli_sweep_on_an_existing_cluster_gives_each_gpu_trial_the_gpu_worker(
    cli_env: dict[str, str], book_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from distributed import Client, Nanny, Scheduler, SpecCluster

    # An already running cluster: two single-threaded workers, one advertising the GPU resource. Trials on
    # device auto ask for a GPU when the cluster has one, so Dask must run both on that worker, one at a
    # time, and leave the other idle (without CUDA here, auto then trains on the CPU).
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    worker = {"host": "127.0.0.1", "nthreads": 1}
    spec = {
        "plain": {"cls": Nanny, "options": worker},
        "gpu": {"cls": Nanny, "options": {**worker, "resources": {"GPU": 1}}},
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    out = tmp_path / "sweep.json"
    with SpecCluster(scheduler=scheduler, workers=spec) as cluster, Client(cluster) as dask_client:
        pids = dask_client.run(os.getpid)
        workers = dask_client.scheduler_info()["workers"]
        gpu_pid = next(str(pids[a]) for a, w in workers.items() if w["resources"].get("GPU"))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "deeprnn.cli.app",
                "sweep",
                "--preset",
                "smoke",
                "--epochs",
                "1",
                "--num-hiddens",
                "8",
                "--cell",
                "lstm,gru",
                "--device",
                "auto",
                "--data-url",
                book_url,
                "--data-sha1",
                BOOK_SHA1,
                "--experiment",
                "cli-sweep",
                "--cluster-address",
                cluster.scheduler_address,
                "--no-register-best",
                "--json",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**cli_env, "PYTHONPATH": str(REPO)},
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 of 2 trials finished" in " ".join(proc.stdout.split())
    result = json.loads(out.read_text())
    client = MlflowClient(tracking_uri=cli_env["MLFLOW_TRACKING_URI"])
    children = _children(client, result["parent_run_id"])
    assert sorted(c.data.params["model.cell"] for c in children) == ["gru", "lstm"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["deeprnn.pid"] for c in children} == {gpu_pid}
    assert not _overlap(children[0], children[1])
    assert not client.search_registered_models()  # --no-register-best


def test_cli_sweep_refuses_bad_spaces_before_starting_anything(cli_env: dict[str, str], tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["--cell", "lstm,transformer"], "model.cell: Input should be 'lstm', 'gru'"),
        (["--param", "train.num_step=16,32"], "did you mean train.num_steps"),
        (["--lr", "0.5,1", "--num-layers", "1,2,3", "--max-trials", "4"], "the grid has 6 trials, more than 4"),
        (["--preset", "smoke"], "nothing to search"),
        (["--space", str(tmp_path / "missing.yaml")], "cannot read search space file"),
    ]
    for args, message in cases:
        outcome = runner.invoke(app, ["sweep", *args])
        assert outcome.exit_code == 2, (args, outcome.output)
        assert message in " ".join(outcome.output.split()), (args, outcome.output)
    assert not Path(cli_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).exists()


def test_gpu_trials_ask_for_one_gpu_and_refuse_a_cluster_without_any() -> None:
    assert gpu_request("cuda", gpus=2) == {"GPU": 1}
    assert gpu_request("auto", gpus=1) == {"GPU": 1}
    assert gpu_request("auto", gpus=0) is None
    assert gpu_request("cpu", gpus=4) is None
    with pytest.raises(ClusterConfigError, match="no Dask worker offers a GPU.*--resources GPU=1"):
        gpu_request("cuda", gpus=0)
