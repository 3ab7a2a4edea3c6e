"""Runs whose process is gone: MLflow runs left ``RUNNING`` by a process killed outright (SIGKILL, the OOM
killer, a power cut) are marked ``FAILED``, with a tag saying why, by the next deeprnn command on the same host.

Every run records the process that opened it (tags ``deeprnn.host``, ``deeprnn.pid`` and
``deeprnn.process_started``, that process's start time, so a reused process id is not taken for the same
process). A run of this host whose process no longer exists cannot be running: nothing will ever close it.
Its checkpoints are untouched, so ``deeprnn run --resume RUN_ID`` continues it as before, when it has one.

Runs of Prefect deployments on a server are watched by Prefect itself (heartbeats and the zombie automation,
``deeprnn.ops.automations``); this covers local runs, which have no server to notice.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from deeprnn.search.study_orphans import process_alive
from deeprnn.tracking import run_checkpoints, runs
from deeprnn.training.resume import LAST

HOST_TAG, PID_TAG, STARTED_TAG = "deeprnn.host", "deeprnn.pid", "deeprnn.process_started"


def process_tags() -> dict[str, str]:
    """The tags that identify this process: host, process id and its start time."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), STARTED_TAG: f"{psutil.Process(pid).create_time():.3f}"}


@dataclass(frozen=True)
class Orphan:
    """A run marked FAILED because its process was gone."""

    run_id: str
    pid: int
    checkpoint: Path | str | None = None  # the checkpoint it can resume from (local file or MLflow artifact)


def mark_orphaned_runs(runs_dir: str | None = None) -> list[Orphan]:
    """Mark every RUNNING run of this host whose recorded process is gone FAILED, with the reason as the
    ``deeprnn.failure_reason`` tag; returns them, each with the checkpoint it can resume from (in ``runs_dir``
    or its MLflow artifacts), if any. Runs of other hosts are left alone."""
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host.replace(chr(39), '')}'"
    found = []
    for run in runs.search_all_runs(query):
        tags = run.data.tags
        pid = int(tags[PID_TAG]) if tags.get(PID_TAG, "").isdigit() else os.getpid()  # no pid: left alone
        if pid == os.getpid() or process_alive(pid, tags.get(STARTED_TAG)):
            continue
        reason = f"process gone: pid {pid} on {host} ended without closing the run (killed or crashed)"
        runs.mark_failed(run.info.run_id, reason)
        local = Path(runs_dir, run.info.run_id, LAST) if runs_dir else None
        found.append(Orphan(run.info.run_id, pid, run_checkpoints.kept_checkpoint(run.info.run_id, local)))
    return found


def mark_crashed_flow_run(flow_run_id: str, reason: str) -> list[str]:
    """Mark every RUNNING MLflow run that Prefect flow run ``flow_run_id`` opened FAILED, with ``reason`` as the
    ``deeprnn.failure_reason`` tag; returns their ids."""
    marked = runs.flow_run_runs(flow_run_id, running_only=True)
    for run_id in marked:
        runs.mark_failed(run_id, reason)
    return marked
