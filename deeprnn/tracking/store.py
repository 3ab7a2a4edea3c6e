"""The MLflow tracking store: which one is in use, whether it is reachable, its first set-up (under a file lock
for a local sqlite file), its schema, experiment ids, and which faults a retry may get past.

The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the working
directory. Against a tracking server, MLflow's HTTP client retries each failed request; deeprnn bounds its waits
(``HTTP_RETRIES``) unless the user set MLflow's variables.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote, urlsplit

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deeprnn.data.urls import redact_url


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached."""


class TrackingStoreOutdatedError(TrackingUnavailableError):
    """The MLflow store was created by an older MLflow: its schema must be upgraded before this one uses it."""


def tracking_uri() -> str:
    """The tracking URI in force (credentials removed: safe to print)."""
    return redact_url(mlflow.get_tracking_uri())


# MLflow's HTTP retries when the user has not set them: a backoff factor of 0 turns off the doubling, so every
# wait is the jitter alone, a random 0-15 s (the first retry is immediate). Ten retries wait about a minute in
# all on average, never over 135 s, and a request goes on at most 15 s after the server is back. MLflow's own
# defaults (7 retries, factor 2, waits up to 120 s each, about 4 minutes) can leave a run asleep a minute after
# a short outage ended; its Retry's backoff_max is not configurable.
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10",  # MLflow refuses more than 10
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "15",
}


# MLflow's own variables for a tracking server's basic auth (``MlflowHostCreds``).
USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def use_tracking_uri(uri: str | None = None) -> None:
    """Point this process's MLflow client at ``uri`` (a sweep trial's, in its worker process), else at the URI
    in force, without the user and password of an http(s) URI: they go to MLflow's own variables (unless the
    user set those), here and in the processes this one starts. MLflow sends them as basic auth all the same,
    and no message it builds from the URI (``API request to <url> failed``) can carry the password any more.
    MLflow's run links go quiet for a URI with credentials, and its HTTP retries are bounded (``HTTP_RETRIES``,
    where the user left MLflow's variables unset)."""
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)
    current = mlflow.get_tracking_uri()
    target = uri or current
    parts = urlsplit(target)
    if redact_url(target) != target:
        # MLflow prints a link to every run it ends ("View run ... at: <tracking URI>/#/..."), with the user and
        # password the URI carries (deeprnn's own links leave them out).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        if parts.scheme in ("http", "https"):
            os.environ.setdefault(USERNAME, unquote(parts.username or ""))
            if parts.password is not None:
                os.environ.setdefault(PASSWORD, unquote(parts.password))
            target = redact_url(target)
    if target == current:
        return
    if uri is None and os.environ.get("MLFLOW_TRACKING_URI") == current:
        os.environ["MLFLOW_TRACKING_URI"] = target  # the environment's URI: MLflow reads it on every call
    else:
        mlflow.set_tracking_uri(target)  # one set in this process (it writes the variable too)


def check_reachable(timeout: float = 5.0) -> str:
    """Fail fast, naming the URI, when the tracking server is down; create a local store's folder.

    Returns the (redacted) URI. Called before any download or training.
    """
    use_tracking_uri()
    uri = mlflow.get_tracking_uri()
    if urlsplit(uri).scheme in ("http", "https"):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout, auth=_basic_auth()).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {redact_url(uri)} is unreachable ({type(exc).__name__}). Start it "
                "(see README: mlflow server) or set MLFLOW_TRACKING_URI to a reachable store"
            ) from None
    _ensure_store()
    return redact_url(uri)


def _basic_auth() -> tuple[str, str] | None:
    """The tracking server's basic auth from MLflow's variables, when they are set."""
    user = os.environ.get(USERNAME)
    return (user, os.environ.get(PASSWORD, "")) if user else None


def _ensure_store() -> None:
    """Create the tracking store once, with its folder and under a file lock for local sqlite stores.

    MLflow creates the sqlite schema (and runs its migrations) on first use; several processes doing that
    at once on a fresh file corrupt it or fail. Serialize the first touch across processes.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        MlflowClient().search_experiments(max_results=1)
        return
    from filelock import FileLock  # a Prefect and MLflow dependency already

    db = Path(uri.removeprefix("sqlite:///"))  # in memory, or a file in the working directory: its folder is "."
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        try:
            MlflowClient().search_experiments(max_results=1)
        except MlflowException as exc:
            # MLflow creates a new store at its own schema but never migrates an existing one by itself.
            if "out-of-date database schema" not in str(exc):
                raise
            found = re.search(r"found version (\w+), but expected (\w+)", str(exc))
            versions = (
                f" (schema {found.group(1)}, this MLflow {mlflow.__version__} needs {found.group(2)})" if found else ""
            )
            raise TrackingStoreOutdatedError(
                f"the MLflow store {redact_url(uri)} was created by an older MLflow{versions}. Back it up (copy "
                f"{db}), then upgrade it with: mlflow db upgrade {redact_url(uri)}"
            ) from None


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if missing (safe when several runs create it at once)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            found = client.get_experiment_by_name(name)  # another process created it first
            if found is None:
                raise
    return found.experiment_id


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk (or quota): not worth retrying until someone frees space (a retry seconds
    later fails again)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def retry_on_io_faults(*never: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A Prefect ``retry_condition_fn``: retry disk, network and MLflow faults, which a second attempt may get
    past, but not a full disk, the ``never`` classes nor anything else (bad settings, divergence fail the same
    way again)."""

    def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except never:
            return False
        except OSError as exc:
            return not is_disk_full(exc)
        except Exception as exc:
            return isinstance(exc, MlflowException)  # a tracking store or server hiccup
        return False

    return worth_retrying


def worker_tracking_uri() -> str:
    """The tracking URI as other processes must see it: a relative sqlite path made absolute.

    Sweep trials run in other processes, possibly started elsewhere; they get this URI explicitly rather
    than trusting their own environment, so that every trial lands in the same store as its sweep.
    """
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        if path and path != ":memory:":
            return "sqlite:///" + str(Path(path).resolve())
    auth = _basic_auth()
    parts = urlsplit(uri)
    if auth and parts.scheme in ("http", "https") and "@" not in parts.netloc:
        # A trial on a machine of its own has none of this process's environment: the credentials go with the
        # URI (a task's argument, never stored), and its process moves them to its environment again.
        return parts._replace(netloc=f"{quote(auth[0], safe='')}:{quote(auth[1], safe='')}@{parts.netloc}").geturl()
    return uri


def is_local_store() -> bool:
    """True when the tracking store is a file on this machine (sqlite or a folder), not a server."""
    return urlsplit(mlflow.get_tracking_uri()).scheme in ("", "file", "sqlite")
