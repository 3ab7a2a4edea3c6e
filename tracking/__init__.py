"""The one module that talks to MLflow.

Everything goes through an explicit ``run_id`` and ``MlflowClient``: MLflow's "active run" is thread-local,
and Prefect may run tasks on other threads. The tracking URI is MLflow's own: ``MLFLOW_TRACKING_URI`` if
set, else ``sqlite:///mlflow.db`` in the working directory.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import signal
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deeprnn.config import RunConfig
from deeprnn.download import CorpusFile, redact_url
from deeprnn.progress import EpochStats, StepStats

log = logging.getLogger(__name__)

REGISTERED_MODEL = "deeprnn-lm"
CHAMPION = "champion"
_PYFUNC_CODE = Path(__file__).with_name("lm_pyfunc.py")
_MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store cannot be reached."""


class TrackingStoreOutdatedError(TrackingUnavailableError):
    """The MLflow store was created by an older MLflow: its schema must be upgraded before this one uses it."""


def tracking_uri() -> str:
    """The tracking URI in force (credentials removed: safe to print)."""
    return redact_url(mlflow.get_tracking_uri())


def check_reachable(timeout: float = 5.0) -> str:
    """Fail fast, naming the URI, when the tracking server is down; create a local store's folder.

    Returns the (redacted) URI. Called before any download or training.
    """
    uri = mlflow.get_tracking_uri()
    scheme = urlsplit(uri).scheme
    if scheme in ("http", "https"):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {redact_url(uri)} is unreachable ({type(exc).__name__}). Start it "
                "(see README: mlflow server) or set MLFLOW_TRACKING_URI to a reachable store"
            ) from None
    elif scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if path is not None and str(path) not in ("", ":memory:"):
            path.parent.mkdir(parents=True, exist_ok=True)
    _ensure_store()
    return redact_url(uri)


def _ensure_store() -> None:
    """Create the tracking store once, under a file lock for local sqlite stores.

    MLflow creates the sqlite schema (and runs its migrations) on first use; several processes doing that
    at once on a fresh file corrupt it or fail. Serialize the first touch across processes.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        MlflowClient().search_experiments(max_results=1)
        return
    from filelock import FileLock  # a Prefect and MLflow dependency already

    db = Path(uri.removeprefix("sqlite:///"))
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
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)  # another process created it first
        if found is None:
            raise
        return found.experiment_id


def _param_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)


def start_run(
    config: RunConfig,
    experiment: str,
    run_name: str | None,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    opened_by: str | None = None,
) -> str:
    """Create the MLflow run with every configuration value as a param; returns its id.

    With ``parent_run_id`` the run is nested under that run (a sweep's trial under the sweep); with
    ``opened_by`` a retry finds the run its earlier attempt created (``create_run``).
    """
    params = config.flat()
    params["data.url"] = redact_url(params["data.url"])  # never log credentials
    return create_run(experiment, run_name, tags, params, parent_run_id, opened_by)


OPENED_BY_TAG = "deeprnn.opened_by"  # the Prefect task run that created the run: its retries find it again


def create_run(
    experiment: str,
    run_name: str | None,
    tags: dict[str, str],
    params: dict[str, Any],
    parent_run_id: str | None = None,
    opened_by: str | None = None,
) -> str:
    """Create a run with these tags and params (lists and dicts as JSON); nested when ``parent_run_id`` is set.

    With ``opened_by`` (the id of the Prefect task run creating it), a retry of that task run that finds the
    run its earlier attempt created completes that run (tags and params again: same values, so no change)
    instead of creating a second one.
    """
    client = MlflowClient()
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}  # what the MLflow UI nests runs by
    exp_id = experiment_id(experiment)
    earlier = run_opened_by(exp_id, opened_by) if opened_by else None
    if earlier is not None:
        set_tags(earlier, tags)
        run_id = earlier
    else:
        tags = {**tags, OPENED_BY_TAG: opened_by} if opened_by else tags
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    log_params(run_id, params)
    return run_id


def run_opened_by(experiment_id: str, opened_by: str) -> str | None:
    """The run that Prefect task run ``opened_by`` created in this experiment, if any."""
    if not re.fullmatch(r"[0-9a-fA-F-]{36}", opened_by):  # it goes into a filter string
        raise ValueError(f"not a Prefect task run id: {opened_by!r}")
    found = MlflowClient().search_runs([experiment_id], f"tags.`{OPENED_BY_TAG}` = '{opened_by}'", max_results=1)
    return found[0].info.run_id if found else None


def log_metrics_once(run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
    """Log final metrics, skipping each one the run already holds with this value (a retry's second write
    would add a second point to its history)."""
    held = MlflowClient().get_run(run_id).data.metrics
    log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None and held.get(k) != float(v)}, step)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params (lists and dicts as JSON, None as empty), 100 per call as MLflow allows."""
    client = MlflowClient()
    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def end_run(run_id: str, status: str) -> None:
    """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
    MlflowClient().set_terminated(run_id, status)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back until the block (MLflow calls) has finished, then raise it.

    A KeyboardInterrupt inside SQLAlchemy makes it drop the connection mid-read, and the sqlite store can stay
    locked while the interrupted cursor lives, so the run could not be marked KILLED afterwards. Only in the
    main thread, and only while Python's default Ctrl-C handler is installed; elsewhere a plain block.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def release_unwound_frames(exc: BaseException) -> None:
    """Free what the frames that ``exc`` unwound still hold, before the store is written again.

    Ctrl-C can land while MLflow is part-way through reading a sqlite store. The half-read cursor, kept
    alive by the traceback's frames, keeps the database's read lock, and every later write (the last
    metrics, the run's KILLED status) would wait for it until sqlite gives up with "database is locked".
    Frames still running (the caller's) are left alone; the traceback still prints in full.
    """
    traceback.clear_frames(exc.__traceback__)
    gc.collect()  # cursors caught in reference cycles too


@contextlib.contextmanager
def run_status(run_id: str) -> Iterator[None]:
    """End the run FINISHED on success, KILLED on Ctrl-C, FAILED on any error: never left RUNNING."""
    try:
        yield
    except KeyboardInterrupt as exc:
        release_unwound_frames(exc)
        end_run(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as exc:
        release_unwound_frames(exc)
        end_run(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    end_run(run_id, RunStatus.to_string(RunStatus.FINISHED))


@dataclass
class RunHandle:
    """What resuming needs to know about an existing run."""

    run_id: str
    status: str
    experiment: str


def find_run(run_id: str) -> RunHandle:
    """The run's status and experiment name; ``LookupError`` naming the run and the store when it is absent."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LookupError(
            f"no MLflow run {run_id!r} in {tracking_uri()}: check the run id and MLFLOW_TRACKING_URI"
        ) from None
    if run.info.lifecycle_stage != "active":
        raise LookupError(f"MLflow run {run_id} was deleted; restore it in MLflow first")
    return RunHandle(run_id, run.info.status, client.get_experiment(run.info.experiment_id).name)


def reopen_run(run_id: str, tags: dict[str, str]) -> None:
    """Set a run back to ``RUNNING`` (to continue it) and update its tags (e.g. the new Prefect flow run)."""
    client = MlflowClient()
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    if "deeprnn.failure_reason" in client.get_run(run_id).data.tags:  # why it stopped last time: no longer true
        client.delete_tag(run_id, "deeprnn.failure_reason")
    set_tags(run_id, tags)


def download_artifact(run_id: str, artifact_path: str, target: Path) -> Path:
    """Copy one artifact file of the run to ``target`` (whole or not at all); ``FileNotFoundError`` when the
    run has no such file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise FileNotFoundError(
                f"MLflow run {run_id} has no artifact {artifact_path!r} to resume from ({type(exc).__name__}): "
                "it never reached its first checkpoint"
            ) from None
        os.replace(local, target)
    return target


_EPOCH_KEYS = ("train_perplexity", "tokens_per_sec", "lr", "heldout_perplexity")
# Logged by runs with a step budget or step-wise evaluation, with the global optimizer step as the step.
STEP_KEYS = ("step_train_perplexity", "step_tokens_per_sec", "step_heldout_perplexity")


def _histories(client: MlflowClient, run_id: str, keys: tuple[str, ...] = _EPOCH_KEYS) -> dict[str, dict[int, float]]:
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}


def epoch_history(run_id: str, upto: int) -> list[EpochStats]:
    """The per-epoch metrics already logged for epochs ``1..upto`` (what a resumed run did before)."""
    h = _histories(MlflowClient(), run_id)
    return [
        EpochStats(
            epoch=e,
            train_perplexity=h["train_perplexity"][e],
            tokens_per_sec=h["tokens_per_sec"].get(e, 0.0),
            seconds=0.0,  # not logged; only the resumed epochs count towards speed
            lr=h["lr"].get(e, 0.0),
            heldout_perplexity=h["heldout_perplexity"].get(e),
        )
        for e in sorted(h["train_perplexity"])
        if e <= upto
    ]


def is_tracking_error(exc: BaseException) -> bool:
    """True for errors from MLflow itself (a store or server hiccup), which a retry may get past."""
    return isinstance(exc, MlflowException)


def retry_on_io_faults(*never: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A Prefect ``retry_condition_fn``: retry disk, network and MLflow faults, which a second attempt may get
    past, but not the ``never`` classes nor anything else (bad settings, divergence fail the same way again)."""

    def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except never:
            return False
        except OSError:
            return True
        except Exception as exc:
            return is_tracking_error(exc)
        return False

    return worth_retrying


# Seconds between system metric samples: short enough that a run of a few seconds records some.
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL = 1.0


@contextlib.contextmanager
def system_metrics(run_id: str, interval: float = SYSTEM_METRICS_INTERVAL) -> Iterator[None]:
    """Log CPU, memory, disk and network use (and GPU use where ``nvidia-ml-py`` finds a GPU) to ``run_id`` as
    ``system/*`` metrics while the block runs, with MLflow's own monitor on a background thread."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=mlflow.get_tracking_uri())
    except ImportError as exc:  # psutil missing: train anyway
        log.warning("system metrics are not logged: %s", exc)
        yield
        return
    monitor.start()
    try:
        yield
    except BaseException as exc:
        release_unwound_frames(exc)  # the first handler a Ctrl-C in training meets: free the store for the writes below
        raise
    finally:
        monitor.finish()  # stops the thread and flushes what it published
        # The thread drops the sample it took last (it publishes only after a full interval): publish it,
        # so that a run shorter than one interval records a point too.
        try:
            last = monitor.aggregate_metrics()
            if last:
                monitor.publish_metrics(last)
                monitor.mlflow_logger.flush()
        except Exception as exc:  # metrics must never fail a training run
            log.warning("last system metrics sample not logged: %s", exc)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    """Set several tags at once."""
    from mlflow.entities import RunTag

    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _log_input_once(run_id: str, dataset: DatasetInput, attempts: int = 3) -> None:
    """Log ``dataset`` as an input of the run. Runs that log the same dataset at the same moment (sweep trials,
    parallel runs) race in MLflow's store, which creates each dataset once per experiment; the one that loses
    gets a UNIQUE-constraint error, and its next attempt finds the dataset the winner created."""
    for attempt in range(1, attempts + 1):
        try:
            MlflowClient().log_inputs(run_id, datasets=[dataset])
            return
        except MlflowException as exc:
            if "UNIQUE constraint failed" not in str(exc) or attempt == attempts:
                raise
            time.sleep(0.2 * attempt)


def log_dataset(run_id: str, corpus: CorpusFile, vocab: dict[str, Any], num_tokens: int | None = None) -> None:
    """Record the corpus's identity (URL, sha1, size, token count) as an MLflow dataset input and as tags."""
    if num_tokens is None:
        num_tokens = sum(freq for _, freq in vocab["token_freqs"])
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import HTTPDatasetSource, LocalArtifactDatasetSource

    source = corpus.source
    # Said explicitly: MLflow's own guess (resolve_dataset_source) warns on every run that an http URL "can
    # be interpreted in multiple ways" (an HTTP source or an http artifact repository).
    is_http = urlsplit(source).scheme in ("http", "https")
    ds_source = HTTPDatasetSource(source) if is_http else LocalArtifactDatasetSource(source)
    dataset = MetaDataset(source=ds_source, name=Path(urlsplit(source).path).name or "corpus", digest=corpus.sha1[:10])
    training = [InputTag("mlflow.data.context", "training")]
    _log_input_once(run_id, DatasetInput(dataset._to_mlflow_entity(), tags=training))
    set_tags(
        run_id,
        {
            "dataset.url": source,
            "dataset.sha1": corpus.sha1,
            "dataset.bytes": corpus.num_bytes,
            "dataset.num_tokens": num_tokens,
            "dataset.vocab_size": len(vocab["idx_to_token"]),
        },
    )


class MetricLogger:
    """Buffers per-epoch metrics and sends them in batches (one ``log_batch`` per flush, not one call each)."""

    def __init__(self, run_id: str, flush_seconds: float = 5.0, resuming: bool = False) -> None:
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self._buffer: list[Metric] = []
        self._last = time.monotonic()
        self._client = MlflowClient()
        # A run that died after its last checkpoint may have logged some of the epochs it now trains again.
        # Those steps are kept as they are and not logged twice, so every curve has one point per epoch.
        self._logged: dict[str, int] = {}
        if resuming:
            logged = _histories(self._client, run_id, _EPOCH_KEYS + STEP_KEYS)
            self._logged = {k: max(v, default=0) for k, v in logged.items()}

    def add_epoch(self, stats: EpochStats) -> None:
        """Queue one epoch's metrics, with the epoch as the step (skipping steps the run already has)."""
        ts = int(time.time() * 1000)
        values = {"train_perplexity": stats.train_perplexity, "tokens_per_sec": stats.tokens_per_sec, "lr": stats.lr}
        if stats.heldout_perplexity is not None:
            values["heldout_perplexity"] = stats.heldout_perplexity
        self._buffer += [
            Metric(k, float(v), ts, stats.epoch) for k, v in values.items() if stats.epoch > self._logged.get(k, 0)
        ]
        if time.monotonic() - self._last > self.flush_seconds:
            self.flush()

    def add_step(self, stats: StepStats) -> None:
        """Queue one progress report as ``step_*`` metrics, with the global optimizer step as the step."""
        ts = int(time.time() * 1000)
        values = {"step_train_perplexity": stats.train_perplexity, "step_tokens_per_sec": stats.tokens_per_sec}
        if stats.heldout_perplexity is not None:
            values["step_heldout_perplexity"] = stats.heldout_perplexity
        self._buffer += [
            Metric(k, float(v), ts, stats.step)
            for k, v in values.items()
            if stats.step > self._logged.get(k, 0) and math.isfinite(v)
        ]
        if time.monotonic() - self._last > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send everything queued."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:_MAX_BATCH], self._buffer[_MAX_BATCH:]
            self._client.log_batch(self.run_id, metrics=chunk)
        self._last = time.monotonic()


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log final (summary) metrics in one call; None values are skipped."""
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    if items:
        MlflowClient().log_batch(run_id, metrics=items)


def log_artifact(run_id: str, path: Path, folder: str | None = None) -> None:
    """Upload one file to the run's artifacts."""
    MlflowClient().log_artifact(run_id, str(path), folder)


def log_text(run_id: str, text: str, name: str) -> None:
    """Store ``text`` as an artifact file named ``name``."""
    MlflowClient().log_text(run_id, text, name)


def pip_requirements() -> list[str]:
    """What the logged model needs, pinned to the versions it was trained with."""
    import pydantic
    import torch

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"mlflow=={mlflow.__version__}",
        f"pydantic=={pydantic.__version__}",
    ]


MODEL_NAME = "model"  # the logged model's name within its run (``runs:/<run_id>/model``)


def default_registered_model(corpus_url: str, corpus_sha1: str) -> str:
    """The registered model a run's model goes to unless the user names one: ``deeprnn-lm`` for the book's
    corpus, else ``deeprnn-<file name>-<first 8 hex digits of its SHA-1>``, so models of different texts
    never become versions of one another."""
    from deeprnn.config import D2L_SHA1

    if corpus_sha1 == D2L_SHA1:
        return REGISTERED_MODEL
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(urlsplit(corpus_url).path).stem).strip("-").lower()[:40]
    return f"deeprnn-{stem or 'corpus'}-{corpus_sha1[:8]}"


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prefix")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("num_chars", "long", 50),
                ParamSpec("temperature", "double", 0.0),  # 0: greedy, as the book
                ParamSpec("top_k", "long", 0),  # 0: no top-k filter
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


def run_logged_model(run_id: str) -> Any | None:
    """The logged model named ``model`` that run ``run_id`` created (what an earlier attempt left), or None."""
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    )
    # A finished one first; else one that an attempt created but did not finish uploading.
    found.sort(key=lambda m: m.status != LoggedModelStatus.READY)
    return found[0] if found else None


@dataclass(frozen=True)
class LoggedModel:
    """A model logged by a run: its id and the URI that loads it."""

    model_id: str  # m-...
    model_uri: str  # models:/<model_id>


def log_model(run_id: str, checkpoint: Path, example_prefix: str) -> LoggedModel:
    """Log the checkpoint as a pyfunc model from code (prefix in, generated text out), once per run.

    Safe to repeat: a model this run already logged is reused (a retry after a partial write finishes the
    upload into the same model rather than creating a second one). The ``deeprnn`` library travels with the
    model (``code_paths``), so loading it needs only the pinned requirements.
    """
    import pandas as pd
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    import deeprnn

    client = MlflowClient()
    logged = run_logged_model(run_id)
    if logged is not None and logged.status == LoggedModelStatus.READY:
        log.info("run %s already logged model %s; reusing it", run_id, logged.model_id)
        return LoggedModel(logged.model_id, f"models:/{logged.model_id}")
    if logged is None:
        # Model.log would file the LoggedModel under the thread's active experiment; create it in the run's
        # own experiment instead, so `runs:/<run_id>/model` resolves and the UI shows it beside the run.
        run = client.get_run(run_id)
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id, params=dict(run.data.params)
        )
    Model.log(
        artifact_path=None,  # deprecated positional in Model.log; ``name`` is the MLflow 3 spelling
        name=MODEL_NAME,
        flavor=mlflow.pyfunc,
        run_id=run_id,
        python_model=str(_PYFUNC_CODE),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(deeprnn.__file__).parent)],
        pip_requirements=pip_requirements(),
        signature=_signature(),
        input_example=pd.DataFrame({"prefix": [example_prefix]}),
        model_id=logged.model_id,
        step=-1,  # Model.log copies the run's metrics of this step to the model: none; ours are linked below
    )
    return LoggedModel(logged.model_id, f"models:/{logged.model_id}")


def link_model_metrics(run_id: str, model_id: str, keys: list[str]) -> dict[str, float]:
    """Attach the run's final values of ``keys`` to the logged model, with the run's training dataset, so the
    Models tab and ``search_logged_models(order_by=metrics.<key>)`` rank models by them.

    The same points (value, step, time) are re-sent with the model's id: the run's curves gain nothing, and
    repeating the call changes nothing. Returns what was linked.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    inputs = run.inputs.dataset_inputs if run.inputs else []
    dataset = inputs[0].dataset if inputs else None
    items = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if not history:
            continue
        last = max(history, key=lambda m: (m.step, m.timestamp))
        items.append(
            Metric(
                key,
                last.value,
                last.timestamp,
                last.step,
                model_id=model_id,
                dataset_name=dataset.name if dataset else None,
                dataset_digest=dataset.digest if dataset else None,
            )
        )
    known = {(m.key, m.step, m.timestamp) for m in client.get_logged_model(model_id).metrics or []}
    fresh = [m for m in items if (m.key, m.step, m.timestamp) not in known]
    if fresh:
        client.log_batch(run_id, metrics=fresh)
    return {m.key: m.value for m in items}


def promote_if_better(name: str, version: str, score: float, heldout_key: str) -> bool:
    """Point the ``champion`` alias at ``version`` if its held-out perplexity beats the current champion's
    on the same held-out text (``heldout_key``: corpus sha1 and split). Returns True when moved."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, "heldout_perplexity", str(score))
    client.set_model_version_tag(name, version, "heldout_key", heldout_key)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and str(current.version) == str(version):
        return True  # a repeated call (a retry): it is the champion already
    if current is not None:
        tags = current.tags or {}
        same_text = tags.get("heldout_key") == heldout_key
        if same_text and float(tags.get("heldout_perplexity", "inf")) <= score:
            return False
        if not same_text:
            log.info("champion v%s was measured on other held-out text; not comparable, keeping it", current.version)
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def run_for_flow_run(flow_run_id: str) -> str:
    """The id of the MLflow run that the Prefect flow run ``flow_run_id`` opened (its ``prefect.flow_run_id``
    tag), in any experiment. Raises LookupError when there is none."""
    if not re.fullmatch(r"[0-9a-fA-F-]{36}", flow_run_id):  # it goes into a filter string
        raise ValueError(f"not a Prefect flow run id: {flow_run_id!r}")
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=1)
    if not runs:
        raise LookupError(f"no MLflow run in {tracking_uri()} was logged by Prefect flow run {flow_run_id}")
    return runs[0].info.run_id


@dataclass(frozen=True)
class DownloadedModel:
    """A logged deeprnn model on local disk, and where it came from."""

    model_uri: str  # pinned: models:/deeprnn-lm/3 rather than models:/deeprnn-lm@champion
    version: str | None  # its registered version, if it has one
    checkpoint: str  # local path of the model's checkpoint
    source_run_id: str | None  # the training run that logged it
    dataset_sha1: str | None  # the corpus hash that run recorded


def fetch_model(model_uri: str, dst: Path) -> DownloadedModel:
    """Download a logged deeprnn model into ``dst`` and say where it came from.

    An alias (``models:/deeprnn-lm@champion``) is pinned to its version first, so the alias moving meanwhile
    cannot mix two models. LookupError when it does not exist.
    """
    from mlflow.models import Model
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    version = None
    try:
        if model_uri.startswith("models:/"):
            found = get_model_name_and_version(client, model_uri)
            if len(found) == 2:  # a registered name and version; a logged model's own id (m-...) has one part
                version = str(found[1])
                model_uri = f"models:/{found[0]}/{version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        source_run_id = mlflow.models.get_model_info(model_uri).run_id
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LookupError(f"cannot fetch model {model_uri!r} from {tracking_uri()}: {first}") from None
    flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
    if not relative:
        raise LookupError(f"model {model_uri!r} is not a deeprnn model: it has no checkpoint artifact")
    if version is None and source_run_id:  # runs:/<id>/model: the version that run registered, if any
        registered = client.search_model_versions(f"run_id = '{source_run_id}'")
        version = str(registered[0].version) if registered else None
    tags = client.get_run(source_run_id).data.tags if source_run_id else {}
    return DownloadedModel(model_uri, version, str(local / relative), source_run_id, tags.get("dataset.sha1"))


def load_pyfunc(model_uri: str) -> Any:
    """Load a logged model (``runs:/...``, ``models:/name@alias``, ...); clear error when it does not exist."""
    try:
        with warnings.catch_warnings():
            # MLflow nags about predict() type hints; this model's signature is declared explicitly instead.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
            return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LookupError(f"cannot load model {model_uri!r} from {tracking_uri()}: {first}") from None


def run_markdown(run_id: str) -> str:
    """The run as markdown: a link when the tracking server has a UI, else its id and store."""
    link = run_url(run_id)
    return f"[{run_id}]({link})" if link else f"`{run_id}` in `{tracking_uri()}`"


def run_url(run_id: str) -> str | None:
    """A browser link to the run when the tracking server is an http(s) one."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    run = MlflowClient().get_run(run_id)
    return f"{redact_url(uri).rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


@dataclass
class RunRecord:
    """What a finished run recorded, for tests and the CLI (times in milliseconds since the epoch)."""

    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int | None = None
    end_time: int | None = None


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        info.run_id, info.status, dict(data.params), dict(data.metrics), dict(data.tags), info.start_time, info.end_time
    )


def get_run(run_id: str) -> RunRecord:
    """Read a run back."""
    return _record(MlflowClient().get_run(run_id))


def child_runs(parent_run_id: str) -> list[RunRecord]:
    """Every run nested under ``parent_run_id``, oldest first."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    return [_record(r) for r in runs]


def register_model(model_uri: str, name: str = REGISTERED_MODEL, run_id: str | None = None) -> str:
    """Register a logged model as a new version of ``name``, once: when ``run_id`` already has a version of
    ``name`` (an earlier attempt of the same task registered it), that version is returned instead."""
    client = MlflowClient()
    if run_id:
        earlier = client.search_model_versions(f"name = '{_quoted(name)}' and run_id = '{run_id}'")
        if earlier:
            version = min(earlier, key=lambda v: int(v.version))
            log.info("run %s is already %s v%s; not registering it again", run_id, name, version.version)
            return str(version.version)
    version = mlflow.register_model(model_uri, name, await_registration_for=30)
    return str(version.version)


def _quoted(text: str) -> str:
    """``text`` safe inside a single-quoted MLflow filter string."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


@dataclass(frozen=True)
class ModelFacts:
    """What a registered version says about itself, in its description and as tags."""

    preset: str
    corpus_url: str  # credentials removed
    corpus_sha1: str
    token: str  # char or word
    perplexities: dict[str, float | None]  # by metric name: val_perplexity, test_perplexity, ...

    def tags(self) -> dict[str, str]:
        """The facts as MLflow tags (perplexities under their metric names; missing ones left out)."""
        named = {"preset": self.preset, "corpus_url": self.corpus_url, "corpus_sha1": self.corpus_sha1}
        values: dict[str, Any] = {**named, "token": self.token, **self.perplexities}
        return {k: str(v) for k, v in values.items() if v is not None}


def describe_version(name: str, version: str, model_id: str | None, facts: ModelFacts, sample: str | None) -> None:
    """Say on the registered version (description and tags) and on its logged model (tags) what it is:
    its ``facts`` and one generated ``sample``."""
    client = MlflowClient()
    tags = facts.tags()
    lines = [
        f"deeprnn language model, preset {facts.preset}, trained on {facts.corpus_url} (SHA-1 {facts.corpus_sha1})."
    ]
    held_out = {k: v for k, v in facts.perplexities.items() if k.endswith("perplexity") and v is not None}
    lines += [f"- {k.replace('_', ' ')}: {v:.3f}" for k, v in held_out.items()]
    if sample:
        lines += ["", f"Greedy sample: {sample}"]
    client.update_model_version(name, version, description="\n".join(lines))
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if model_id:
        client.set_logged_model_tags(model_id, tags)


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
    return uri


def use_tracking_uri(uri: str) -> None:
    """Point this process's MLflow client at ``uri`` (a sweep trial, in its worker process)."""
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)


def is_local_store() -> bool:
    """True when the tracking store is a file on this machine (sqlite or a folder), not a server."""
    return urlsplit(mlflow.get_tracking_uri()).scheme in ("", "file", "sqlite")
