"""Checks the command makes in milliseconds before it starts Prefect or MLflow: a local corpus that is missing
or unreadable, a device this machine does not have, a ``--resume`` run the tracking store does not hold.

Each check refuses only what it is sure of and leaves anything else to the flow, whose tasks check the same
things again (a deployment run has no CLI in front of it). None of them imports torch, Prefect or MLflow: a
refusal comes before the seconds those take to load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from deeprnn.cli.output import fail
from deeprnn.data.urls import redact_url

CHECKPOINT_ARTIFACT = "checkpoints/last.pt"  # a run's resumable checkpoint, as its MLflow artifact
REMOTE_TIMEOUT = 3.0  # seconds a tracking server gets to answer the run lookup; after that the flow decides
TABLES = ("tags", "params")  # a run's key-value pairs, in every store
FILE_STORE_STATUS = {1: "RUNNING", 3: "FINISHED", 4: "FAILED", 5: "KILLED"}  # the file store's RunStatus numbers


def check_source(url: str | None) -> None:
    """Exit 1 when ``--data-url`` is a local file or folder that is missing or unreadable (or an unknown scheme)."""
    if url is None:
        return
    from deeprnn.data import download

    try:
        download.check_source(url)
    except download.DownloadError as exc:
        fail(str(exc), 1)


def check_device(name: str) -> None:
    """Exit 1 when ``--device`` names a device that is surely absent here (``missing_device``)."""
    problem = missing_device(name)
    if problem:
        fail(problem, 1)


def missing_device(name: str, platform: str = sys.platform) -> str | None:
    """Why ``name`` cannot be used here, judged without importing torch; None when it may exist (torch decides
    later). CUDA is surely absent when torch was built without it, or on Linux without the NVIDIA driver's
    device files; MPS exists on macOS only. The messages are those of ``deeprnn.device.resolve_device``."""
    if name.startswith("cuda"):
        build = _torch_build()
        if build.get("hip"):
            return None  # ROCm builds use the cuda device names with their own driver files
        no_driver = platform.startswith("linux") and not any(
            Path(p).exists() for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg")
        )
        if ("cuda" in build and build["cuda"] is None) or no_driver:
            version = build.get("__version__") or "unknown"
            return (
                f"device {name!r} was requested but this machine has no usable CUDA GPU "
                f"(torch {version}); use --device cpu or --device auto"
            )
    if name == "mps" and platform != "darwin":
        return "device 'mps' was requested but Apple MPS is not available here"
    return None


def _torch_build() -> dict[str, str | None]:
    """``torch.version``'s ``__version__``, ``cuda`` and ``hip``, read from its source without importing torch
    (about two seconds). Empty when it cannot be read."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return {}
    try:
        text = (Path(spec.origin).parent / "version.py").read_text(encoding="utf-8")
    except OSError:
        return {}
    found = re.findall(r"^(__version__|cuda|hip)\b[^=\n]*=\s*(.+)$", text, re.MULTILINE)
    return {key: None if value.strip() == "None" else value.strip().strip("'\"") for key, value in found}


def check_resume(run_id: str, experiment: str | None, runs_dir: str, train: dict[str, Any]) -> None:
    """Exit 1 when ``--resume run_id`` surely cannot go on (``resume_refusal``), before Prefect starts."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"  # the store MLflow uses by default
    problem = resume_refusal(run_id, uri, experiment, runs_dir, train)
    if problem:
        fail(problem, 1)


def resume_refusal(run_id: str, uri: str, experiment: str | None, runs_dir: str, train: dict[str, Any]) -> str | None:
    """Why ``run_id`` cannot be resumed from the store at ``uri`` with these options (``--experiment``, the
    ``--runs-dir``, the ``train`` options given): absent or deleted, another experiment's, no checkpoint
    left, or FINISHED with nothing left to train. The messages are those of the flow's resume task. None
    when it may go on, or when the store cannot be read quickly (the flow then decides)."""
    from deeprnn.training import resume

    found = stored_run(run_id, uri)
    if found == "":
        return f"no MLflow run {run_id!r} in {redact_url(uri)}: check the run id and MLFLOW_TRACKING_URI"
    if found is None:
        return None
    if found.stage != "active":
        return f"MLflow run {run_id} was deleted; restore it in MLflow first"
    if experiment and found.experiment is not None and experiment != found.experiment:
        return f"run {run_id} belongs to experiment {found.experiment!r}, not {experiment!r}"
    local = resume.run_folder(runs_dir, run_id) / resume.LAST
    if not local.is_file() and found.artifact_missing(CHECKPOINT_ARTIFACT):
        return resume.no_checkpoint(run_id, found.tags, local)
    return _nothing_left(run_id, found, train) if found.status == "FINISHED" else None


def _nothing_left(run_id: str, found: StoredRun, train: dict[str, Any]) -> str | None:
    """``resume.nothing_left`` for a FINISHED run, from its tags and params and the ``train`` options given
    (malformed values are left to the configuration's own check)."""
    from deeprnn.durations import DurationError, parse_budget
    from deeprnn.training import resume

    reason = found.tags.get("deeprnn.stop_reason", "")
    try:
        epochs, budget = int(found.setting("epochs") or 0), parse_budget(found.setting("time_budget"))
        steps = train.get("max_steps", found.setting("max_steps"))
        at_step = int(found.tags.get("deeprnn.stopped_at_step") or 0)
        done = resume.Finished(reason, epochs if reason == "epochs" else 0, at_step, budget)
        given_budget = parse_budget(train["time_budget"]) if "time_budget" in train else budget
        steps = None if steps is None else int(steps)
        return resume.nothing_left(run_id, done, int(train.get("epochs") or epochs), steps, given_budget)
    except (ValueError, TypeError, DurationError):
        return None


@dataclass
class StoredRun:
    """What a tracking store holds of a run, read without MLflow: its lifecycle stage, status, experiment
    name, tags, params and artifact location (None where not read)."""

    stage: str
    status: str
    experiment: str | None
    tags: dict[str, str]
    params: dict[str, str]
    artifact_uri: str | None = None

    def setting(self, name: str) -> str | None:
        """The train setting the run last ran with: its ``resumed.train.<name>`` tag, else its param ("" and
        "None": unset)."""
        value = self.tags.get(f"resumed.train.{name}", self.params.get(f"train.{name}"))
        return None if value in ("", "None") else value

    def artifact_missing(self, path: str) -> bool:
        """Whether the artifact ``path`` is surely absent: only a local artifact folder can tell."""
        uri = self.artifact_uri or ""
        if uri.startswith("file:"):
            uri = unquote(urlsplit(uri).path)
        elif not uri.startswith("/"):
            return False  # a remote store or a proxied one: the flow asks MLflow
        return not (Path(uri) / path).is_file()


def stored_run(run_id: str, uri: str) -> StoredRun | str | None:
    """The run as the store at ``uri`` holds it; "" when the store surely lacks it; None when it cannot tell
    quickly (databricks and other stores, a locked or foreign database, an unreachable server)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("", "file"):
        return _file_store_run(Path(unquote(urlsplit(uri).path) if scheme else uri), run_id)
    if scheme in ("http", "https"):
        return _server_run(uri, run_id)
    path = uri.removeprefix("sqlite:///").split("?")[0]
    if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
        return None
    return _sqlite_run(Path(path), run_id) if Path(path).exists() else ""  # no store yet: it holds no run


def _sqlite_run(path: Path, run_id: str) -> StoredRun | str | None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)) as db:
            row = db.execute(
                "SELECT r.lifecycle_stage, r.status, e.name, r.artifact_uri FROM runs r "
                "LEFT JOIN experiments e ON e.experiment_id = r.experiment_id WHERE r.run_uuid = ?",
                (run_id,),
            ).fetchone()
            tags, params = (
                dict(db.execute(f"SELECT key, value FROM {t} WHERE run_uuid = ?", (run_id,))) for t in TABLES
            )
    except sqlite3.Error:
        return None  # locked, not an MLflow store, an older schema: MLflow reports it in the flow
    return "" if row is None else StoredRun(row[0], row[1] or "", row[2], tags, params, row[3])


def _file_store_run(root: Path, run_id: str) -> StoredRun | str:
    """The run in a file store: ``<root>/<experiment id>/<run id>/meta.yaml``, one file per tag and param."""
    for meta in root.glob(f"*/{run_id}/meta.yaml"):
        run, experiment = _yaml(meta), _yaml(meta.parent.parent / "meta.yaml")
        status = FILE_STORE_STATUS.get(run.get("status"), "")
        tags, params = (_files(meta.parent / table) for table in TABLES)
        stage = run.get("lifecycle_stage", "active")
        return StoredRun(stage, status, experiment.get("name"), tags, params, run.get("artifact_uri"))
    return ""


def _yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _files(folder: Path) -> dict[str, str]:
    """A file store's tags or params: one file per key (a key with '/' in it is a nested path)."""
    return {str(f.relative_to(folder)): f.read_text(encoding="utf-8") for f in folder.rglob("*") if f.is_file()}


def _server_run(uri: str, run_id: str) -> StoredRun | str | None:
    import requests

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", "")) if user else None
    url = uri.rstrip("/") + "/api/2.0/mlflow/runs/get"
    try:
        response = requests.get(url, params={"run_id": run_id}, auth=auth, timeout=REMOTE_TIMEOUT)
        if response.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in response.text:
            return ""
        response.raise_for_status()
        run = response.json()["run"]
        tags, params = ({p["key"]: p.get("value", "") for p in run.get("data", {}).get(t, [])} for t in TABLES)
        # The experiment's name is one more request: only its id is read here, and the flow compares names.
        return StoredRun(run["info"]["lifecycle_stage"], run["info"].get("status", ""), None, tags, params)
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return None  # unreachable (the flow's check says so, clearly), or an answer that is not MLflow's
