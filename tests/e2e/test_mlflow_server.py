"""Runs compared on a real ``mlflow server`` on 127.0.0.1, as the README starts it for the UI: three training
flows with different settings, found through the REST API sorted by held-out perplexity with their params and
full metric histories; the registry's champion alias; generation and evaluation from the champion."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from corpora import IS_BOOK
from live_servers import Server

import deeprnn.tracking.metrics
import deeprnn.tracking.model_registry
import deeprnn.tracking.store
from deeprnn.flows.evaluate_flow import evaluate_lm
from deeprnn.flows.train_flow import train_lm
from deeprnn.tasks.results_tasks import RunResult

pytestmark = pytest.mark.e2e

EPOCHS = (1, 3, 2)  # three smoke runs that differ in training length, in this order
EXPERIMENT = "compare-smoke"


def rest(server: Server, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """One call to MLflow's REST API; fails the test on an error status."""
    response = requests.request(method, f"{server.url}/api/2.0/mlflow/{path}", timeout=30, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def champion_version(server: Server) -> str:
    """The registered version that the ``champion`` alias points at now (through the REST API)."""
    found = rest(
        server,
        "GET",
        "registered-models/alias",
        params={"name": deeprnn.tracking.model_registry.REGISTERED_MODEL, "alias": "champion"},
    )
    return found["model_version"]["version"]


@dataclass
class Compared:
    """The training runs made against the server, in order, and the champion after each."""

    server: Server
    results: list[RunResult]
    champions: list[str]


@pytest.fixture(scope="module")
def compared(
    mlflow_server: Server, prefect_api: str, book_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Compared]:
    """Three smoke training flows logging to the server (epochs 1, 3, 2), the champion noted after each.

    MLFLOW_TRACKING_URI points at the server for every test of this module (in-process MLflow calls too)."""
    root = tmp_path_factory.mktemp("compare")
    results, champions = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        mp.setenv("DEEPRNN_CACHE_DIR", str(root / "cache"))
        mp.chdir(root)
        for epochs in EPOCHS:
            results.append(
                train_lm(
                    preset="smoke",
                    data={"url": book_url, "sha1": BOOK_SHA1},
                    train={"device": "cpu", "epochs": epochs},
                    experiment=EXPERIMENT,
                    runs_dir=str(root / "runs"),
                    # The book's models go to deeprnn-lm by default (the evaluate flow's default too); the
                    # stand-in's would get a model of their own, so they are sent there by name.
                    **({} if IS_BOOK else {"registered_model": deeprnn.tracking.model_registry.REGISTERED_MODEL}),
                )
            )
            champions.append(champion_version(mlflow_server))
        yield Compared(mlflow_server, results, champions)


def test_rest_api_finds_runs_sorted_by_heldout_perplexity_with_params_and_histories(compared: Compared) -> None:
    server = compared.server
    experiment = rest(server, "GET", "experiments/get-by-name", params={"experiment_name": EXPERIMENT})["experiment"]
    found = rest(
        server,
        "POST",
        "runs/search",
        json={"experiment_ids": [experiment["experiment_id"]], "order_by": ["metrics.test_perplexity ASC"]},
    )["runs"]
    ours = {r.run_id: r for r in compared.results}
    assert {r["info"]["run_id"] for r in found} == set(ours)

    def metric(run: dict[str, Any], key: str) -> float:
        return next(m["value"] for m in run["data"]["metrics"] if m["key"] == key)

    heldout = [metric(r, "test_perplexity") for r in found]
    assert heldout == sorted(heldout) and len(set(heldout)) == len(EPOCHS), heldout
    for run in found:
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        epochs = int(params["train.epochs"])
        assert params["preset"] == "smoke" and params["model.num_layers"] == "2"
        assert ours[run_id].evaluation.test_perplexity == pytest.approx(metric(run, "test_perplexity"))
        histories = {
            key: rest(server, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": key})["metrics"]
            for key in (
                "train_perplexity",
                "heldout_perplexity",
                "tokens_per_sec",
                "system/cpu_utilization_percentage",
                "system/system_memory_usage_megabytes",
            )
        }
        # Full per-epoch histories, one point per epoch ...
        for key in ("train_perplexity", "heldout_perplexity", "tokens_per_sec"):
            assert sorted(m["step"] for m in histories[key]) == list(range(1, epochs + 1)), (run_id, key)
        last = next(m["value"] for m in histories["train_perplexity"] if m["step"] == epochs)
        assert metric(run, "final_train_perplexity") == pytest.approx(last)
        # ... and system metrics sampled while it trained.
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            assert histories[key] and all(m["value"] >= 0 for m in histories[key]), (run_id, key)
        assert max(m["value"] for m in histories["system/system_memory_usage_megabytes"]) > 0
    assert sorted(int({p["key"]: p["value"] for p in r["data"]["params"]}["train.epochs"]) for r in found) == sorted(
        EPOCHS
    )


def test_champion_alias_moves_only_to_a_better_model_on_the_same_heldout_text(compared: Compared) -> None:
    versions = [r.model.registration.version for r in compared.results]
    scores = [r.evaluation.test_perplexity for r in compared.results]  # smoke has no validation split
    # What the rule says the champion must be after each run: the best so far.
    expected = [versions[min(range(i + 1), key=lambda j: scores[j])] for i in range(len(versions))]
    assert compared.champions == expected
    moved = [r.model.registration.champion for r in compared.results]
    assert moved[0] is True and True in moved[1:] and False in moved[1:], "runs that both move and keep the alias"
    # Every version records the score it was judged on and the held-out text it was measured on.
    for version, score in zip(versions, scores):
        params = {"name": deeprnn.tracking.model_registry.REGISTERED_MODEL, "version": version}
        found = rest(compared.server, "GET", "model-versions/get", params=params)
        tags = {t["key"]: t["value"] for t in found["model_version"]["tags"]}
        assert float(tags["heldout_perplexity"]) == pytest.approx(score)
        assert tags["heldout_key"] == f"{BOOK_SHA1}:char:val=0.0:test=0.1"


def test_generate_from_the_champion_alias(compared: Compared) -> None:
    champion = next(r for r in compared.results if r.model.registration.version == compared.champions[-1])
    prefixes = list(champion.samples)
    num_tokens = len(champion.samples[prefixes[0]]) - len(prefixes[0])
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeprnn.cli.app",
            "generate",
            "--model-uri",
            "models:/deeprnn-lm@champion",
            "--num-tokens",
            str(num_tokens),
            *sum((["--prefix", p] for p in prefixes), []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=compared.server.env,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert cli.stdout.splitlines()[-len(prefixes) :] == list(champion.samples.values())


def test_training_summary_links_to_the_mlflow_run(compared: Compared) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    result = compared.results[-1]
    run = rest(compared.server, "GET", "runs/get", params={"run_id": result.run_id})["run"]
    flow_run_id = next(t["value"] for t in run["data"]["tags"] if t["key"] == "prefect.flow_run_id")
    with get_client(sync_client=True) as client:
        by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        artifacts = client.read_artifacts(artifact_filter=by_run)
    (summary,) = [a for a in artifacts if a.type == "markdown"]
    link = f"{compared.server.url}/#/experiments/{run['info']['experiment_id']}/runs/{result.run_id}"
    assert f"]({link})" in summary.data
    assert [a.data for a in artifacts if a.type == "progress"] == [pytest.approx(100.0)]


def test_evaluate_flow_measures_the_champion_on_its_heldout_text(compared: Compared) -> None:
    champion = next(r for r in compared.results if r.model.registration.version == compared.champions[-1])
    result = evaluate_lm(device="cpu", sample={"num_tokens": 7, "prefixes": ["the time"]})  # default: the champion
    assert result.model_uri == f"models:/{deeprnn.tracking.model_registry.REGISTERED_MODEL}/{compared.champions[-1]}"
    assert result.source_run_id == champion.run_id
    assert result.evaluation.test_perplexity == pytest.approx(champion.evaluation.test_perplexity, rel=1e-5)
    assert list(result.samples) == ["the time"] and len(result.samples["the time"]) == len("the time") + 7
    run = rest(compared.server, "GET", "runs/get", params={"run_id": result.run_id})["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["requested_model_uri"] == "models:/deeprnn-lm@champion" and params["source_run_id"] == champion.run_id
    assert run["info"]["status"] == "FINISHED"
    experiment = rest(compared.server, "GET", "experiments/get", params={"experiment_id": run["info"]["experiment_id"]})
    assert experiment["experiment"]["name"] == "deeprnn-evaluate"


def test_evaluate_flow_names_a_missing_model_and_marks_its_run_failed(compared: Compared) -> None:
    missing = f"models:/{deeprnn.tracking.model_registry.REGISTERED_MODEL}/99"
    with pytest.raises(LookupError, match=f"cannot fetch model '{missing}' from {compared.server.url}"):
        evaluate_lm(model_uri=missing, device="cpu")
    experiment = rest(compared.server, "GET", "experiments/get-by-name", params={"experiment_name": "deeprnn-evaluate"})
    found = rest(
        compared.server,
        "POST",
        "runs/search",
        json={
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"params.requested_model_uri = '{missing}'",
        },
    )["runs"]
    assert [r["info"]["status"] for r in found] == ["FAILED"]


def test_system_metrics_record_points_even_for_a_block_shorter_than_one_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    for seconds, at_least in ((0.0, 1), (2.5 * deeprnn.tracking.metrics.SYSTEM_METRICS_INTERVAL, 2)):
        run_id = client.create_run(deeprnn.tracking.store.experiment_id("system-metrics")).info.run_id
        with deeprnn.tracking.metrics.system_metrics(run_id):
            time.sleep(seconds)
        for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
            history = client.get_metric_history(run_id, key)
            assert len(history) >= at_least, (seconds, key, history)
            assert sorted(m.step for m in history) == list(range(len(history)))
