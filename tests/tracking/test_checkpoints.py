"""deeprnn.tracking.run_checkpoints against a real local store: a checkpoint is uploaded only once it matches its
digest,
and fetched back only once the MLflow copy matches its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deeprnn.config import preset_config
from deeprnn.data.vocab import Vocab
from deeprnn.model import RNNLM
from deeprnn.tracking import run_checkpoints, runs
from deeprnn.training import checkpoint


def _saved(folder: Path, epoch: int) -> Path:
    config = preset_config("smoke", {"model": {"num_hiddens": 8, "num_layers": 1}, "train": {"device": "cpu"}})
    vocab = Vocab("the time traveller")
    model = RNNLM.from_config(len(vocab), config.model)
    return checkpoint.save(folder / "last.pt", checkpoint.make_payload(config, vocab, model, epoch=epoch))


def test_a_damaged_file_is_never_uploaded_and_a_damaged_copy_is_never_fetched(experiment: str, tmp_path: Path) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    good = _saved(tmp_path / "good", epoch=2)
    run_checkpoints.upload_checkpoint(run_id, good)
    assert run_checkpoints.kept_checkpoint(run_id) == run_checkpoints.CHECKPOINT_ARTIFACT

    damaged = _saved(tmp_path / "damaged", epoch=3)
    os.truncate(damaged, damaged.stat().st_size - 100)
    with pytest.raises(checkpoint.DamagedCheckpointError, match="is damaged"):
        run_checkpoints.upload_checkpoint(run_id, damaged)
    # The good copy is still the run's, and it replaces a damaged local file whole, digest and all.
    saved = run_checkpoints.fetch_checkpoint(run_id, damaged)
    assert saved["epoch"] == 2 and checkpoint.load(damaged)["epoch"] == 2
    assert sorted(p.name for p in damaged.parent.iterdir()) == ["last.pt", "last.pt.sha256"]  # no download left over

    # A damaged MLflow copy (its store's disk, say) is refused, naming the artifact; the local file stays.
    copy = Path(MlflowClient().download_artifacts(run_id, run_checkpoints.CHECKPOINT_ARTIFACT, str(tmp_path / "dl")))
    os.truncate(copy, copy.stat().st_size // 2)
    MlflowClient().log_artifact(run_id, str(copy), "checkpoints")
    local = _saved(tmp_path / "local", epoch=5)
    with pytest.raises(checkpoint.DamagedCheckpointError, match="the MLflow copy of the checkpoint .* is damaged"):
        run_checkpoints.fetch_checkpoint(run_id, local)
    assert checkpoint.load(local)["epoch"] == 5
