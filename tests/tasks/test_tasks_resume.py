"""deeprnn.tasks.train_task's ``prepare_resume`` through ``task.fn()`` (no Prefect server, no flow), against a real
MLflow sqlite store in a temporary folder: where the checkpoint comes from, what configuration the run continues
with, and every refusal before anything is changed."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from mlflow.tracking import MlflowClient

from deeprnn.config import RunConfig, preset_config
from deeprnn.data.vocab import Vocab
from deeprnn.model import RNNLM
from deeprnn.tasks.train_task import prepare_resume
from deeprnn.tracking.run_checkpoints import CHECKPOINT_ARTIFACT
from deeprnn.training import checkpoint
from deeprnn.training.resume import ResumeError

EXPERIMENT = "resume-unit"


@dataclass
class Store:
    """The module's MLflow store and a folder of checkpoints to log."""

    root: Path
    client: MlflowClient
    experiment_id: str

    def run_with_checkpoint(self, config: RunConfig, epoch: int, status: str = "FAILED") -> str:
        """A run of ``EXPERIMENT`` that logged a checkpoint of ``epoch`` epochs, then ended with ``status``."""
        run_id = self.client.create_run(self.experiment_id).info.run_id
        path = save_checkpoint(self.root / run_id / "last.pt", config, epoch)
        self.client.log_artifact(run_id, str(path), "checkpoints")
        self.client.set_terminated(run_id, status)
        return run_id


def save_checkpoint(path: Path, config: RunConfig, epoch: int) -> Path:
    """A checkpoint as training writes it (a tiny model of the configured shape, no trainer state)."""
    vocab = Vocab(list("the time machine"))
    model = RNNLM.from_config(len(vocab), config.model)
    return checkpoint.save(path, checkpoint.make_payload(config, vocab, model, epoch=epoch))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("resume-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        client = MlflowClient()
        yield Store(root / "logged", client, client.create_experiment(EXPERIMENT))


def _config(epochs: int = 3) -> RunConfig:
    return preset_config("smoke", {"model": {"num_hiddens": 8}, "train": {"device": "cpu", "epochs": epochs}})


def test_a_missing_local_checkpoint_is_fetched_from_the_run(store: Store, tmp_path: Path) -> None:
    run_id = store.run_with_checkpoint(_config(epochs=3), epoch=2)
    config, experiment = prepare_resume.fn(run_id, str(tmp_path / "runs"), None)
    assert experiment == EXPERIMENT
    assert config == _config(epochs=3)  # the checkpoint's configuration, unchanged
    local = tmp_path / "runs" / run_id / "last.pt"
    assert local.read_bytes() == (store.root / run_id / "last.pt").read_bytes()
    assert CHECKPOINT_ARTIFACT == "checkpoints/last.pt"


def test_the_local_checkpoint_is_used_when_there_is_one(store: Store, tmp_path: Path) -> None:
    run_id = store.run_with_checkpoint(_config(epochs=3), epoch=2)
    save_checkpoint(tmp_path / "runs" / run_id / "last.pt", _config(epochs=6), epoch=4)  # newer than the logged
    config, _ = prepare_resume.fn(run_id, str(tmp_path / "runs"), EXPERIMENT)
    assert config.train.epochs == 6


def test_allowed_overrides_apply_and_a_finished_run_needs_more_epochs(store: Store, tmp_path: Path) -> None:
    run_id = store.run_with_checkpoint(_config(epochs=3), epoch=3, status="FINISHED")
    runs = str(tmp_path / "runs")
    with pytest.raises(ResumeError, match=f"run {run_id} already FINISHED its 3 epochs, .*: give --epochs above 3"):
        prepare_resume.fn(run_id, runs, None)
    config, _ = prepare_resume.fn(run_id, runs, None, train={"epochs": 5, "device": "cpu"})
    assert config.train.epochs == 5 and config.model.num_hiddens == 8


def test_refusals_name_what_to_change_and_change_nothing(store: Store, tmp_path: Path) -> None:
    run_id = store.run_with_checkpoint(_config(epochs=3), epoch=2)
    runs = tmp_path / "runs"
    with pytest.raises(ResumeError, match="'../x' is not an MLflow run id"):
        prepare_resume.fn("../x", str(runs), None)
    with pytest.raises(LookupError, match=f"no MLflow run '{'a' * 32}'"):
        prepare_resume.fn("a" * 32, str(runs), None)
    with pytest.raises(ResumeError, match=f"run {run_id} belongs to experiment '{EXPERIMENT}', not 'other'"):
        prepare_resume.fn(run_id, str(runs), "other")
    assert not runs.exists()  # refused before the checkpoint was fetched
    with pytest.raises(ResumeError, match="model.num_hiddens: the checkpoint has 8, given 16"):
        prepare_resume.fn(run_id, str(runs), None, model={"num_hiddens": 16})
    with pytest.raises(ResumeError, match="the checkpoint already has 2 epochs done; --epochs 1 would undo them"):
        prepare_resume.fn(run_id, str(runs), None, train={"epochs": 1})


def test_a_finished_run_whose_time_budget_is_spent_needs_a_longer_one(store: Store, tmp_path: Path) -> None:
    config = preset_config("smoke", {"model": {"num_hiddens": 8}, "train": {"device": "cpu", "time_budget": 2}})
    run_id = store.run_with_checkpoint(config, epoch=1, status="FINISHED")
    store.client.set_tag(run_id, "deeprnn.stop_reason", "time_budget")
    runs = str(tmp_path / "runs")
    for train in (None, {"epochs": 5000}, {"time_budget": "2s"}):
        with pytest.raises(ResumeError, match=r"FINISHED its time budget \(2s\), so nothing is left to train: give a"):
            prepare_resume.fn(run_id, runs, None, train=train)
    assert prepare_resume.fn(run_id, runs, None, train={"time_budget": "1m"})[0].train.time_budget == 60.0
    assert prepare_resume.fn(run_id, runs, None, train={"time_budget": "off"})[0].train.time_budget is None


def test_lost_checkpoint_files_are_told_apart_from_a_run_that_never_logged_one(store: Store, tmp_path: Path) -> None:
    run_id = store.run_with_checkpoint(_config(epochs=3), epoch=2, status="KILLED")
    store.client.set_tag(run_id, "deeprnn.checkpoint", CHECKPOINT_ARTIFACT)  # as every upload tags it
    shutil.rmtree(Path(store.client.get_run(run_id).info.artifact_uri) / "checkpoints")
    with pytest.raises(ResumeError, match=f"MLflow run {run_id} logged a checkpoint, but its files are gone"):
        prepare_resume.fn(run_id, str(tmp_path / "runs"), None)
    never = store.client.create_run(store.experiment_id).info.run_id
    store.client.set_terminated(never, "KILLED")
    with pytest.raises(ResumeError, match=f"MLflow run {never} has no checkpoint to resume from: it stopped before"):
        prepare_resume.fn(never, str(tmp_path / "runs"), None)
