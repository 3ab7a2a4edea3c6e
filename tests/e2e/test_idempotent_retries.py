"""Retries that never duplicate: each retrying task that creates something in MLflow or Prefect fails once right
after its side effect, Prefect retries it for real, and exactly one of each thing exists afterwards.

The faults are injected (an MLflow write that fails once, on cue, cannot be produced for real); the tasks,
their retries, Prefect and the MLflow store are real."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

import deeprnn.tasks.evaluate_tasks as evaluation
import deeprnn.tasks.pipeline_tasks as pipeline
import deeprnn.tracking.runs
import deeprnn.tracking.store
from deeprnn.flows.evaluate_flow import evaluate_lm
from deeprnn.flows.train_flow import train_lm
from deeprnn.search.space import make_trial, parse_space
from deeprnn.tasks.sweep_tasks import start_sweep_tracking

pytestmark = pytest.mark.e2e


def fail_once_after(real: Callable[..., Any], exc: BaseException) -> tuple[Callable[..., Any], list[int]]:
    """``real``, except that its first call does its work and then raises ``exc`` (a write that landed but
    whose answer was lost). Returns the wrapper and the list of calls made."""
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == 1:
            raise exc
        return result

    return wrapper, calls


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("retries")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DEEPRNN_CACHE_DIR", str(root / "cache"))
        deeprnn.tracking.store.check_reachable()
        yield root


def _runs(experiment: str) -> list[Any]:
    found = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([found.experiment_id]) if found else []


def _task_run_counts(flow_run_id: str) -> dict[str, int]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.run_count for r in runs}  # task run names end in a short id


@pytest.fixture(scope="module")
def trained(store: Path, book_url: str) -> dict[str, Any]:
    """A smoke run whose start-mlflow-run fails once right after creating the MLflow run (logging its params
    raises), and is retried."""
    log_params, calls = fail_once_after(deeprnn.tracking.runs.log_params, MlflowException("lost answer from the store"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deeprnn.tracking.runs, "log_params", log_params)
        mp.setattr(pipeline, "start_tracking", pipeline.start_tracking.with_options(retry_delay_seconds=0))
        result = train_lm(
            preset="smoke",
            data={"url": book_url},
            train={"device": "cpu", "epochs": 1},
            experiment="retried-start",
            runs_dir=str(store / "runs"),
        )
    return {"result": result, "calls": calls}


def test_a_retried_start_mlflow_run_leaves_one_run(trained: dict[str, Any]) -> None:
    (run,) = _runs("retried-start")
    assert run.info.run_id == trained["result"].run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["preset"] == "smoke" and run.data.params["train.epochs"] == "1"
    counts = _task_run_counts(run.data.tags["prefect.flow_run_id"])
    assert counts["start-mlflow-run"] == 2  # the fault was real to Prefect: the task ran twice
    assert run.data.tags[deeprnn.tracking.runs.OPENED_BY_TAG]


def test_retried_evaluation_start_and_publish_leave_one_run_one_metric_point_and_one_summary(
    trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    log_params, _ = fail_once_after(deeprnn.tracking.runs.log_params, MlflowException("lost answer from the store"))
    artifact, artifact_calls = fail_once_after(evaluation.create_markdown_artifact, OSError("connection reset"))
    monkeypatch.setattr(deeprnn.tracking.runs, "log_params", log_params)
    monkeypatch.setattr(evaluation, "create_markdown_artifact", artifact)
    for name in ("start_evaluation", "publish_evaluation"):
        monkeypatch.setattr(evaluation, name, getattr(evaluation, name).with_options(retry_delay_seconds=0))
    result = evaluate_lm(model_uri=f"runs:/{trained['result'].run_id}/model", device="cpu", experiment="retried-eval")

    (run,) = _runs("retried-eval")
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    counts = _task_run_counts(flow_run_id)
    assert counts["start-evaluation-run"] == 2 and counts["publish-evaluation"] == 2
    # publish-evaluation's first attempt logged the metrics and made the summary before failing.
    assert len(artifact_calls) == 1
    history = MlflowClient().get_metric_history(run.info.run_id, "test_perplexity")
    assert len(history) == 1
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert [a.key for a in artifacts if a.type == "markdown"] == ["deeprnn-evaluation-summary"]


def test_a_retried_start_sweep_run_leaves_one_parent_run(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = parse_space({"model.num_hiddens": [8, 16]})
    first = make_trial("smoke", {"train": {"device": "cpu"}}, space, 0, {"model.num_hiddens": 8})
    log_text, calls = fail_once_after(deeprnn.tracking.runs.log_texts, MlflowException("lost answer from the store"))
    monkeypatch.setattr(deeprnn.tracking.runs, "log_texts", log_text)
    start = start_sweep_tracking.with_options(retry_delay_seconds=0)

    @flow
    def open_sweep() -> str:
        return start(first, space, {"strategy": "grid"}, "retried-sweep", 2)

    parent = open_sweep()
    (run,) = _runs("retried-sweep")
    assert run.info.run_id == parent and len(calls) == 2
    assert run.data.params["sweep.num_trials"] == "2"
    assert "space.json" in {a.path for a in MlflowClient().list_artifacts(parent)}
