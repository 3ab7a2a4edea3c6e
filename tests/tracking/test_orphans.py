"""deeprnn.ops.orphans against a real local store: runs left RUNNING by a process that is gone are marked FAILED, and
only those with a checkpoint (in the runs folder or in MLflow) are said to be resumable."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from deeprnn.ops import orphans
from deeprnn.tracking import run_checkpoints, runs


def _dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()  # reaped: the id names no process now
    return done.pid


def test_orphans_are_marked_failed_and_only_runs_with_a_checkpoint_are_resumable(
    tracking_store: str, experiment: str, tmp_path: Path
) -> None:
    pid = str(_dead_pid())
    tags = {orphans.HOST_TAG: socket.gethostname(), orphans.PID_TAG: pid}
    never, local, uploaded = (runs.create_run(experiment, name, tags, {}) for name in ("never", "local", "uploaded"))
    runs_dir = tmp_path / "runs"
    (runs_dir / local).mkdir(parents=True)
    (runs_dir / local / "last.pt").write_bytes(b"a checkpoint")
    MlflowClient().log_artifact(uploaded, str(runs_dir / local / "last.pt"), "checkpoints")

    found = {o.run_id: o for o in orphans.mark_orphaned_runs(str(runs_dir)) if o.run_id in (never, local, uploaded)}
    assert found[never].checkpoint is None
    assert found[local].checkpoint == runs_dir / local / "last.pt"
    assert found[uploaded].checkpoint == run_checkpoints.CHECKPOINT_ARTIFACT
    for run_id in (never, local, uploaded):
        assert MlflowClient().get_run(run_id).info.status == "FAILED"
