"""A run's resumable checkpoint in MLflow: uploaded only once verified on disk, fetched back only once it
matches its digest, and whether a run has one at all (a run without one is never offered ``--resume``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deeprnn.training import checkpoint
from deeprnn.training.resume import CHECKPOINT_TAG

CHECKPOINT_FOLDER = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_FOLDER}/last.pt"  # the resumable checkpoint, as the run's artifact


def kept_checkpoint(run_id: str, local: Path | None = None) -> Path | str | None:
    """Where run ``run_id``'s resumable checkpoint is: the ``local`` file when it exists, else the run's
    ``checkpoints/last.pt`` artifact (as that path), else None: nothing to resume from."""
    if local is not None and local.is_file():
        return local
    try:
        listed = MlflowClient().list_artifacts(run_id, CHECKPOINT_FOLDER)
    except (MlflowException, OSError):
        return None
    return CHECKPOINT_ARTIFACT if any(f.path == CHECKPOINT_ARTIFACT for f in listed) else None


def upload_checkpoint(run_id: str, path: Path) -> None:
    """Upload a checkpoint and its digest file as the run's ``checkpoints/`` artifacts, only once the file on
    disk matches its digest (``DamagedCheckpointError`` otherwise): a damaged file never replaces a good copy.
    The run is tagged ``deeprnn.checkpoint``, so a resume can tell a run that never had one from lost files."""
    checkpoint.verify(path)
    client = MlflowClient()
    for file in (path, checkpoint.digest_path(path)):  # verified: the checkpoint is there; its digest may not be
        if file.is_file():
            client.log_artifact(run_id, str(file), CHECKPOINT_FOLDER)
    client.set_tag(run_id, CHECKPOINT_TAG, CHECKPOINT_ARTIFACT)  # the run had one, even once its files are gone


def fetch_checkpoint(run_id: str, target: Path) -> dict[str, Any]:
    """The run's ``checkpoints/last.pt`` artifact, checked against its digest and loaded, then put at
    ``target`` (with its digest file) in place of whatever was there; ``FileNotFoundError`` when the run has
    none, ``DamagedCheckpointError`` naming the artifact when it does not match its digest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp)
            )
        except (MlflowException, OSError) as exc:
            raise FileNotFoundError(
                f"MLflow run {run_id} has no artifact {CHECKPOINT_ARTIFACT!r} to resume from ({type(exc).__name__}): "
                "it never reached its first checkpoint"
            ) from None
        digest = CHECKPOINT_ARTIFACT + checkpoint.DIGEST_SUFFIX  # beside it; a run checkpointed before digests has none
        with contextlib.suppress(MlflowException, OSError):
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=digest, dst_path=tmp)
        try:
            saved = checkpoint.load(local)
        except ValueError as exc:
            raise checkpoint.DamagedCheckpointError(
                f"the MLflow copy of the checkpoint ({CHECKPOINT_ARTIFACT} of run {run_id}) is damaged too: "
                + str(exc).replace(str(local), CHECKPOINT_ARTIFACT)
            ) from None
        checkpoint.digest_path(target).unlink(missing_ok=True)  # no stale digest beside the new file
        os.replace(local, target)
        if checkpoint.digest_path(local).is_file():
            os.replace(checkpoint.digest_path(local), checkpoint.digest_path(target))
    return saved
