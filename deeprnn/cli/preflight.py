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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from deeprnn.cli.output import fail
from deeprnn.data.urls import redact_url

CHECKPOINT_ARTIFACT = "checkpoints/last.pt"  # a run's resumable checkpoint, as its MLflow artifact
# The store MLflow uses when MLFLOW_TRACKING_URI is not set.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REMOTE_TIMEOUT = 3.0  # seconds a tracking server gets to answer the run lookup; after that the flow decides


def check_source(url: str | None) -> None:
    """Exit 1 when ``--data-url`` is a local file or folder that is missing or unreadable (or an unknown scheme)."""
    if url is None:
        return
    from deeprnn.data.download import DownloadError
    from deeprnn.data.download import check_source as check

    try:
        check(url)
    except DownloadError as exc:
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
    found: dict[str, str | None] = {}
    for key, value in re.findall(r"^(__version__|cuda|hip)\b[^=\n]*=\s*(.+)$", text, re.MULTILINE):
        value = value.strip()
        found[key] = None if value == "None" else value.strip("'\"")
    return found


def check_resume(
    run_id: str | None, experiment: str | None = None, runs_dir: str = "runs", train: dict[str, Any] | None = None
) -> None:
    """Exit 1 when ``--resume run_id`` surely cannot go on (``resume_refusal``), before Prefect starts."""
    if run_id is None:
        return
    problem = resume_refusal(
        run_id, os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI, experiment, runs_dir, train or {}
    )
    if problem:
        fail(problem, 1)


def resume_refusal(run_id: str, uri: str, experiment: str | None, runs_dir: str, train: dict[str, Any]) -> str | None:
    """Why ``run_id`` cannot be resumed from the store at ``uri`` with these options (``--experiment``, the
    ``--runs-dir``, the ``train`` options given): absent or deleted, another experiment's, no checkpoint
    left, or FINISHED with nothing left to train. The messages are those of the flow's resume task. None
    when it may go on, or when the store cannot be read quickly (the flow then decides)."""
    from deeprnn.training import resume

    found = stored_run(run_id, uri)
    absent = _absent(run_id, uri, found)
    if absent or not isinstance(found, StoredRun):
        return absent
    if experiment and found.experiment is not None and experiment != found.experiment:
        return f"run {run_id} belongs to experiment {found.experiment!r}, not {experiment!r}"
    local = resume.run_folder(runs_dir, run_id) / resume.LAST
    if not local.is_file() and found.artifact_missing(CHECKPOINT_ARTIFACT):
        return resume.no_checkpoint(run_id, found.tags, local)
    if found.status != "FINISHED":
        return None
    return _nothing_left(run_id, found, train)


def _nothing_left(run_id: str, found: StoredRun, train: dict[str, Any]) -> str | None:
    """``resume.nothing_left`` for a FINISHED run, from its tags and params and the ``train`` options given
    (malformed values are left to the configuration's own check)."""
    from deeprnn.durations import DurationError, parse_budget
    from deeprnn.training import resume

    reason = found.tags.get("deeprnn.stop_reason", "")
    try:
        epochs, max_steps, budget = (found.setting(k) for k in ("epochs", "max_steps", "time_budget"))
        stored_epochs, stored_budget = int(epochs or 0), parse_budget(budget or None)
        done = resume.Finished(
            reason,
            stored_epochs if reason == "epochs" else 0,
            int(found.tags.get("deeprnn.stopped_at_step") or 0),
            stored_budget,
        )
        given_steps = train.get("max_steps", max_steps or None)
        given_budget = parse_budget(train["time_budget"]) if "time_budget" in train else stored_budget
        steps = None if given_steps is None else int(given_steps)
        return resume.nothing_left(run_id, done, int(train.get("epochs") or stored_epochs), steps, given_budget)
    except (ValueError, TypeError, DurationError):
        return None


@dataclass
class StoredRun:
    """What a tracking store holds of a run, read without MLflow: its lifecycle stage, status, experiment
    name, tags, params and artifact location (None where not read)."""

    stage: str
    status: str = ""
    experiment: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
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


def missing_run(run_id: str, uri: str) -> str | None:
    """Why ``run_id`` cannot be resumed from the store at ``uri``: it is not there, or it was deleted. None
    when it is there, or the store cannot be asked quickly (the flow then looks it up and reports it)."""
    return _absent(run_id, uri, stored_run(run_id, uri))


def _absent(run_id: str, uri: str, found: StoredRun | str | None) -> str | None:
    if found == "":
        return f"no MLflow run {run_id!r} in {redact_url(uri)}: check the run id and MLFLOW_TRACKING_URI"
    if isinstance(found, StoredRun) and found.stage != "active":
        return f"MLflow run {run_id} was deleted; restore it in MLflow first"
    return None


def stored_run(run_id: str, uri: str) -> StoredRun | str | None:
    """The run as the store at ``uri`` holds it; "" when the store surely lacks it; None when it cannot tell
    quickly (databricks and other stores, a locked or foreign database, an unreachable server)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        return _sqlite_run(uri, run_id)
    if scheme in ("", "file"):
        return _file_store_run(uri, run_id)
    if scheme in ("http", "https"):
        return _server_run(uri, run_id)
    return None


def _sqlite_run(uri: str, run_id: str) -> StoredRun | str | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    if path in ("", ":memory:"):
        return None
    if not Path(path).exists():
        return ""  # no store yet: it holds no run
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)) as db:
            row = db.execute(
                "SELECT r.lifecycle_stage, r.status, e.name, r.artifact_uri FROM runs r "
                "LEFT JOIN experiments e ON e.experiment_id = r.experiment_id WHERE r.run_uuid = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                return ""
            tags = db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall()
            params = db.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall()
    except sqlite3.Error:
        return None  # locked, not an MLflow store, an older schema: MLflow reports it in the flow
    return StoredRun(str(row[0]), str(row[1] or ""), row[2], dict(tags), dict(params), row[3])


def _file_store_run(uri: str, run_id: str) -> StoredRun | str | None:
    root = Path(unquote(urlsplit(uri).path) if uri.lower().startswith("file:") else uri)
    if not root.is_dir():
        return ""
    for meta in root.glob(f"*/{run_id}/meta.yaml"):
        text = meta.read_text(encoding="utf-8")
        stage = re.search(r"^lifecycle_stage:\s*(\w+)", text, re.MULTILINE)
        found = StoredRun(stage.group(1) if stage else "active")
        # The file store keeps the status as a number (RunStatus: 1 RUNNING, 3 FINISHED, 4 FAILED, 5 KILLED).
        status = re.search(r"^status:\s*(\d+)", text, re.MULTILINE)
        found.status = {"1": "RUNNING", "3": "FINISHED", "4": "FAILED", "5": "KILLED"}.get(
            status.group(1) if status else "", ""
        )
        artifacts = re.search(r"^artifact_uri:\s*(\S+)", text, re.MULTILINE)
        found.artifact_uri = artifacts.group(1) if artifacts else None
        name = re.search(r"^name:\s*(.+)$", _read(meta.parent.parent / "meta.yaml"), re.MULTILINE)
        found.experiment = name.group(1).strip().strip("'\"") if name else None
        found.tags, found.params = _files(meta.parent / "tags"), _files(meta.parent / "params")
        return found
    return ""


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _files(folder: Path) -> dict[str, str]:
    """A file store's tags or params: one file per key (a key with '/' in it is a nested path)."""
    if not folder.is_dir():
        return {}
    return {str(f.relative_to(folder)): _read(f) for f in folder.rglob("*") if f.is_file()}


def _server_run(uri: str, run_id: str) -> StoredRun | str | None:
    import requests

    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1")
    try:
        response = requests.get(
            uri.rstrip("/") + "/api/2.0/mlflow/runs/get",
            params={"run_id": run_id},
            headers=headers,
            auth=auth,
            verify=verify,
            timeout=REMOTE_TIMEOUT,
        )
    except requests.RequestException:
        return None  # unreachable: the flow's check says so, clearly
    if response.status_code == 404 and "RESOURCE_DOES_NOT_EXIST" in response.text:
        return ""
    if response.status_code != 200:
        return None
    try:
        run = response.json()["run"]
        info, data = run["info"], run.get("data", {})
        pairs = {k: {p["key"]: p.get("value", "") for p in data.get(k, [])} for k in ("tags", "params")}
        # The experiment's name is one more request: only its id is read here, and the flow compares names.
        return StoredRun(
            str(info["lifecycle_stage"]), str(info.get("status", "")), None, pairs["tags"], pairs["params"]
        )
    except (ValueError, KeyError, TypeError):
        return None
