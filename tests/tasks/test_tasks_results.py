"""deeprnn.tasks.results_tasks without a server: what makes two models' held-out perplexities comparable (the
champion), and
the names a run is opened with (a local sqlite MLflow store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deeprnn.config import D2L_SHA1, DataConfig, preset_config, resolve
from deeprnn.data.download import fetch_corpus
from deeprnn.tasks.results_tasks import heldout_text_key, start_tracking


def test_the_books_tokens_keep_the_key_earlier_champions_were_tagged_with() -> None:
    data = preset_config("d2l-9.3").data
    assert heldout_text_key(data, D2L_SHA1) == f"{D2L_SHA1}:char:val=0.0:test=0.1"


def test_other_tokens_of_the_same_text_are_not_comparable() -> None:
    book = heldout_text_key(DataConfig(), D2L_SHA1)
    keys = {
        book,
        heldout_text_key(DataConfig(normalize="none"), D2L_SHA1),
        heldout_text_key(DataConfig(normalize="lower"), D2L_SHA1),
        heldout_text_key(DataConfig(min_freq=3), D2L_SHA1),
        heldout_text_key(DataConfig(reserved_tokens=["<eos>"]), D2L_SHA1),
        heldout_text_key(DataConfig(token="word"), D2L_SHA1),
        heldout_text_key(DataConfig(test_fraction=0.2), D2L_SHA1),
        heldout_text_key(DataConfig(), "0" * 40),
    }
    assert len(keys) == 8
    assert heldout_text_key(DataConfig(max_tokens=500), D2L_SHA1) == book  # training length is not held-out text


def test_start_tracking_names_the_run_and_puts_an_own_text_in_its_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    text = tmp_path / "Faust.txt"
    text.write_text("Habe nun, ach! Philosophie,\n" * 50, encoding="utf-8")
    config = resolve("smoke", data={"url": str(text)}, model={"num_layers": 2, "num_hiddens": 64})
    corpus = fetch_corpus(str(text))
    client = MlflowClient()

    run_id, _, experiment = start_tracking.fn(config, corpus, "deeprnn-train", str(tmp_path / "runs"))
    run = client.get_run(run_id)
    assert run.info.run_name == f"smoke\u00b7faust-{corpus.sha1[:8]}\u00b7lstm2x64"
    assert client.get_experiment(run.info.experiment_id).name == experiment == f"deeprnn-faust-{corpus.sha1[:8]}"

    named, _, _ = start_tracking.fn(config, corpus, "my-texts", str(tmp_path / "runs"))  # --experiment
    assert client.get_experiment(client.get_run(named).info.experiment_id).name == "my-texts"
