"""Checks the command makes in milliseconds before it starts Prefect or MLflow: a local corpus that is missing
or unreadable, a device this machine does not have, a ``--resume`` run the tracking store does not hold.

Each check refuses only what it is sure of and leaves anything else to the flow, whose tasks check the same
things again (a deployment run has no CLI in front of it). None of them imports torch, Prefect or MLflow: a
refusal comes before the seconds those take to load.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sqlite3
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from deeprnn.cli.output import fail
from deeprnn.data.urls import redact_url

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


def check_resume(run_id: str | None) -> None:
    """Exit 1 when the tracking store surely has no active run ``run_id`` (``missing_run``)."""
    if run_id is None:
        return
    problem = missing_run(run_id, os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    if problem:
        fail(problem, 1)


def missing_run(run_id: str, uri: str) -> str | None:
    """Why ``run_id`` cannot be resumed from the store at ``uri``: it is not there, or it was deleted. None
    when it is there, or the store cannot be asked quickly (the flow then looks it up and reports it)."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        stage = _sqlite_stage(uri, run_id)
    elif scheme in ("", "file"):
        stage = _file_store_stage(uri, run_id)
    elif scheme in ("http", "https"):
        stage = _server_stage(uri, run_id)
    else:
        return None  # databricks and other stores: the flow asks MLflow
    if stage == "":
        return f"no MLflow run {run_id!r} in {redact_url(uri)}: check the run id and MLFLOW_TRACKING_URI"
    if stage is not None and stage != "active":
        return f"MLflow run {run_id} was deleted; restore it in MLflow first"
    return None


# The lookups below return the run's lifecycle stage, "" when the store surely lacks it, None when unsure.


def _sqlite_stage(uri: str, run_id: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    if path in ("", ":memory:"):
        return None
    if not Path(path).exists():
        return ""  # no store yet: it holds no run
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as db:
            row = db.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    except sqlite3.Error:
        return None  # locked, not an MLflow store, an older schema: MLflow reports it in the flow
    return "" if row is None else str(row[0])


def _file_store_stage(uri: str, run_id: str) -> str | None:
    root = Path(unquote(urlsplit(uri).path) if uri.lower().startswith("file:") else uri)
    if not root.is_dir():
        return ""
    for meta in root.glob(f"*/{run_id}/meta.yaml"):
        deleted = re.search(r"^lifecycle_stage:\s*(\w+)", meta.read_text(encoding="utf-8"), re.MULTILINE)
        return deleted.group(1) if deleted else "active"
    return ""


def _server_stage(uri: str, run_id: str) -> str | None:
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
        return str(response.json()["run"]["info"]["lifecycle_stage"])
    except (ValueError, KeyError, TypeError):
        return None
