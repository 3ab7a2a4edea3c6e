"""The real training flow (smoke preset) under Prefect's harness, logging to a real sqlite MLflow store,
the corpus downloaded over HTTP from 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from corpora import CORPUS_MODEL, CORPUS_NUM_CHARS, TRAIN_EXPERIMENT
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from mlflow.tracking import MlflowClient

from deeprnn.config import preset_config
from deeprnn.flows.train_flow import FLOW_NAME, train_lm

pytestmark = pytest.mark.e2e


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= _artifact_paths(client, run_id, info.path)
        else:
            out.add(info.path)
    return out


def test_smoke_flow_logs_everything_and_model_reproduces_samples(workdir: Path, book_url: str) -> None:
    result = train_lm(preset="smoke", data={"url": book_url, "sha1": BOOK_SHA1}, train={"device": "cpu"})
    client = MlflowClient()
    run = client.get_run(result.run_id)
    config = preset_config("smoke", {"data": {"url": book_url, "sha1": BOOK_SHA1}, "train": {"device": "cpu"}})

    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == TRAIN_EXPERIMENT  # the book's: FLOW_NAME
    # Named after what ran, in MLflow and in Prefect: preset, corpus (file stem, SHA-1 prefix), model.
    assert run.info.run_name == f"smoke\u00b7timemachine-{BOOK_SHA1[:8]}\u00b7lstm2x32"
    assert run.data.tags["prefect.flow_run_name"] == run.info.run_name
    # Every configuration value is a param, with its resolved value.
    params = run.data.params
    assert set(config.flat()) <= set(params)
    assert params["model.num_layers"] == "2" and params["train.batch_size"] == "8"
    assert params["data.url"] == book_url and params["preset"] == "smoke"
    # Per-epoch curves, one point per epoch, steps 1..epochs.
    epochs = config.train.epochs
    for key in ("train_perplexity", "tokens_per_sec", "heldout_perplexity"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, epochs + 1)), key
        assert all(m.value > 0 for m in history)
    metrics = run.data.metrics
    assert 1.0 < metrics["test_perplexity"] < 40.0  # better than guessing among 28 symbols is not required, sane is
    assert metrics["final_train_perplexity"] == pytest.approx(
        client.get_metric_history(run.info.run_id, "train_perplexity")[-1].value
    )
    # The dataset's identity and the link back to Prefect.
    tags = run.data.tags
    assert tags["dataset.sha1"] == BOOK_SHA1 and tags["dataset.num_tokens"] == str(CORPUS_NUM_CHARS)
    assert tags["dataset.vocab_size"] == "28"
    assert tags["prefect.flow_run_id"] and tags["prefect.flow_name"] == FLOW_NAME
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == BOOK_SHA1[:10]
    # Artifacts: vocabulary, samples, plot, config, resumable checkpoint.
    artifacts = _artifact_paths(client, run.info.run_id)
    assert {
        "vocab.json",
        "samples.txt",
        "samples.json",
        "perplexity.png",
        "config.json",
        "checkpoints/last.pt",
        "checkpoints/last.pt.sha256",  # its digest, checked before it is loaded
    } <= artifacts
    vocab = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/vocab.json")
    assert vocab["idx_to_token"][:3] == ["<unk>", " ", "e"] and len(vocab["idx_to_token"]) == 28
    samples_txt = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/samples.txt").splitlines()
    assert samples_txt == list(result.samples.values())
    assert all(len(s) == len(p) + config.sample.num_tokens for p, s in result.samples.items())

    # The logged model, loaded back three ways, prints exactly the logged greedy samples.
    prefixes = list(result.samples)
    for uri in (f"runs:/{run.info.run_id}/model", result.model.logged.model_uri, f"models:/{CORPUS_MODEL}@champion"):
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(pd.DataFrame({"prefix": prefixes}), params={"num_tokens": config.sample.num_tokens})
        assert out == samples_txt, uri
    assert result.model.registration is not None and result.model.registration.champion is True

    # And from the command line, in a separate process.
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeprnn.cli.app",
            "generate",
            "--model-uri",
            f"runs:/{run.info.run_id}/model",
            "--num-tokens",
            str(config.sample.num_tokens),
            *sum((["--prefix", p] for p in prefixes), []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.splitlines()[-len(prefixes) :] == samples_txt


def test_wrong_sha1_fails_clearly_caches_nothing_and_opens_no_run(workdir: Path, book_url: str) -> None:
    wrong = "0" * 40
    with pytest.raises(Exception, match=f"sha1 mismatch.*expected {wrong}, got {BOOK_SHA1}"):
        train_lm(preset="smoke", data={"url": book_url, "sha1": wrong}, train={"device": "cpu"})
    cache = workdir / "cache"
    assert not cache.exists() or not any(cache.iterdir())
    # The corpus is fetched before the MLflow run is opened: a text that cannot be had leaves no run behind.
    experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
    assert not experiments or MlflowClient().search_runs(experiments) == []


def test_cli_run_prints_run_id_perplexities_and_samples(cli_env: dict[str, str], book_url: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeprnn.cli.app",
            "run",
            "--preset",
            "smoke",
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--data-url",
            book_url,
            "--data-sha1",
            BOOK_SHA1,
            "--experiment",
            "cli-check",
            "--num-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = proc.stdout.strip().splitlines()[-1].removeprefix("run id: ").strip()
    run = MlflowClient(tracking_uri=cli_env["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "2"
    assert f"{run.data.metrics['test_perplexity']:,.3f}" in proc.stdout
    # The samples continue the prefixes the run recorded: the book's own, or lines drawn from the stand-in text.
    prefixes = json.loads(run.data.params["sample.prefixes"])
    assert prefixes and all(prefix in proc.stdout for prefix in prefixes), (prefixes, proc.stdout)
    assert "epoch 2/2" in proc.stdout + proc.stderr


def test_cli_refuses_bad_values_before_starting_anything(cli_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeprnn.cli.app",
            "run",
            "--num-layers",
            "0",
            "--dropout",
            "1.5",
            "--cell",
            "transformer",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env,
    )
    assert proc.returncode == 2
    assert "--num-layers" in proc.stderr and "--dropout" in proc.stderr and "--cell" in proc.stderr
    assert not (Path(cli_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))).exists()


def test_installed_deeprnn_command_is_the_cli(cli_env: dict[str, str]) -> None:
    """The console script that `pip install` writes (the README's `deeprnn run`) reaches the same CLI."""
    script = Path(sys.executable).with_name("deeprnn")
    assert script.is_file(), "install the project first (scripts/test.sh does): pip install -e ."
    listed = subprocess.run([str(script), "presets"], capture_output=True, text=True, timeout=120, env=cli_env)
    assert listed.returncode == 0 and all(name in listed.stdout for name in ("d2l-9.3", "full-book", "smoke"))
    refused = subprocess.run(
        [str(script), "run", "--num-layers", "0"], capture_output=True, text=True, timeout=120, env=cli_env
    )
    assert refused.returncode == 2 and "--num-layers" in refused.stderr
