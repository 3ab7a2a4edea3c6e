"""MLflow runs: create (once per Prefect task run), find, reopen and end them (FINISHED, FAILED, or KILLED on
Ctrl-C), their params, tags, dataset input and artifacts, and reading them back (records, children, UI links).

Everything goes through an explicit ``run_id`` and ``MlflowClient``: MLflow's "active run" is thread-local, and
Prefect may run tasks on other threads.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import shutil
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import mlflow
from mlflow.entities import DatasetInput, InputTag, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deeprnn.config import RunConfig
from deeprnn.data.download import CorpusFile
from deeprnn.data.urls import redact_url
from deeprnn.data.vocab import Vocab
from deeprnn.sizing import decided_later
from deeprnn.tracking import run_checkpoints
from deeprnn.tracking.store import experiment_id, tracking_uri
from deeprnn.training import stop_signals


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
    later = decided_later(config)  # the text preset's size and prefixes: logged once sized to the text
    params = {k: v for k, v in config.flat().items() if k not in later}  # JSON: the URL without credentials
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
    if opened_by:
        tags = {**tags, OPENED_BY_TAG: check_prefect_id(opened_by, "task run")}
    query = f"tags.`{OPENED_BY_TAG}` = '{opened_by}'"  # the run an earlier attempt of this task run created
    earlier = client.search_runs([exp_id], query, max_results=1) if opened_by else []
    if earlier:
        run_id = earlier[0].info.run_id
        set_tags(run_id, tags)
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    log_params(run_id, params)
    return run_id


def check_prefect_id(value: str, kind: str) -> str:
    """Return ``value`` if it looks like a Prefect ``kind`` id (a UUID), else raise ValueError: it goes into an
    MLflow filter string, so nothing else may."""
    if not re.fullmatch(r"[0-9a-fA-F-]{36}", value):
        raise ValueError(f"not a Prefect {kind} id: {value!r}")
    return value


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log params (lists and dicts as JSON, None as empty); MLflow's client sends them 100 per request."""
    values = {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in params.items()}
    MlflowClient().log_batch(run_id, params=[Param(k, "" if v is None else str(v)) for k, v in values.items()])


FAILURE_REASON_TAG = "deeprnn.failure_reason"  # why a run that could not end itself was marked FAILED


def mark_failed(run_id: str, reason: str) -> None:
    """End a run whose process cannot end it any more (gone, or lost with its worker) FAILED, with ``reason``
    as its ``deeprnn.failure_reason`` tag."""
    set_tags(run_id, {FAILURE_REASON_TAG: reason})
    MlflowClient().set_terminated(run_id, "FAILED")


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C (and, in a ``deeprnn`` command, SIGTERM) back until the block (MLflow calls) has finished,
    then raise it.

    A KeyboardInterrupt inside SQLAlchemy makes it drop the connection mid-read, and the sqlite store can stay
    locked while the interrupted cursor lives, so the run could not be marked KILLED afterwards. With the
    command's stop handler (``deeprnn.training.stop_signals``) both signals are held back in the main thread;
    otherwise only while Python's default Ctrl-C handler is installed; elsewhere a plain block.
    """
    main = threading.current_thread() is threading.main_thread()
    if main and stop_signals.installed():
        with stop_signals.held():
            yield
    elif main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        received: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            if received:
                raise KeyboardInterrupt
    else:
        yield


def release_unwound_frames(exc: BaseException) -> None:
    """Free what the frames that ``exc`` unwound still hold, before the store is written again.

    Ctrl-C can land while MLflow is part-way through reading a sqlite store. The half-read cursor, kept
    alive by the traceback's frames, keeps the database's read lock, and every later write (the last
    metrics, the run's KILLED status) would wait for it until sqlite gives up with "database is locked".
    Frames still running (the caller's) are left alone; the traceback still prints in full.
    """
    traceback.clear_frames(exc.__traceback__)
    gc.collect()  # cursors caught in reference cycles too


STOP_TAG = "deeprnn.stopped"  # how a run stopped by SIGINT or SIGTERM continues, or that it cannot


@contextlib.contextmanager
def run_status(run_id: str, checkpoint: Path | None = None) -> Iterator[None]:
    """End the run FINISHED on success, KILLED on Ctrl-C or SIGTERM, FAILED on any error: never left RUNNING.

    A stopped training run (``checkpoint``: its local resumable file) gets a ``deeprnn.stopped`` tag with the
    command that continues it when it has a checkpoint (that file, or the run's ``checkpoints/last.pt``
    artifact), and the ``StopRequested`` carries the run id and that checkpoint up to the command that prints
    them.
    """
    try:
        yield
    except BaseException as exc:
        release_unwound_frames(exc)
        stopped = isinstance(exc, KeyboardInterrupt)
        if stopped and checkpoint is not None:  # a training run: say whether and how it continues
            kept = run_checkpoints.kept_checkpoint(run_id, checkpoint)
            note = f"continue with: deeprnn run --resume {run_id}"
            if kept is None:
                note = "stopped before its first checkpoint: nothing to resume; start a new run"
            set_tags(run_id, {STOP_TAG: note})
            if isinstance(exc, stop_signals.StopRequested):
                exc.run_id, exc.checkpoint = run_id, kept
        MlflowClient().set_terminated(run_id, "KILLED" if stopped else "FAILED")
        raise
    MlflowClient().set_terminated(run_id, "FINISHED")


def find_run(run_id: str) -> RunRecord:
    """The run with its experiment's name; ``LookupError`` naming the run and the store when it is absent."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LookupError(
            f"no MLflow run {run_id!r} in {tracking_uri()}: check the run id and MLFLOW_TRACKING_URI"
        ) from None
    if run.info.lifecycle_stage != "active":
        raise LookupError(f"MLflow run {run_id} was deleted; restore it in MLflow first")
    return replace(_record(run), experiment=client.get_experiment(run.info.experiment_id).name)


def reopen_run(run_id: str, tags: dict[str, str]) -> None:
    """Set a run back to ``RUNNING`` (to continue it) and update its tags (e.g. the new Prefect flow run)."""
    client = MlflowClient()
    client.update_run(run_id, status="RUNNING")
    for tag in {FAILURE_REASON_TAG, STOP_TAG} & client.get_run(run_id).data.tags.keys():
        client.delete_tag(run_id, tag)  # why and how it stopped last time: no longer true
    set_tags(run_id, tags)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    """Set several tags at once."""
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


def log_dataset(run_id: str, corpus: CorpusFile, vocab: Vocab, num_tokens: int) -> None:
    """Record the corpus's identity (URL, sha1, size, token count) as an MLflow dataset input and as tags."""
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
    facts = {"url": source, "sha1": corpus.sha1, "bytes": corpus.num_bytes, "num_tokens": num_tokens}
    set_tags(run_id, {f"dataset.{key}": value for key, value in {**facts, "vocab_size": len(vocab)}.items()})


def log_texts(run_id: str, texts: dict[str, str], files: Sequence[Path] = ()) -> None:
    """Store each text as an artifact file of the run under its name (``{"vocab.json": "..."}``), with copies of
    the small ``files``, in one upload. Files the run already has are replaced: a retry rewrites them."""
    with tempfile.TemporaryDirectory(prefix="deeprnn-artifacts-") as folder:
        for name, text in texts.items():
            Path(folder, name).write_text(text, encoding="utf-8")
        for path in files:
            shutil.copyfile(path, Path(folder, path.name))
        MlflowClient().log_artifacts(run_id, folder)


def run_for_flow_run(flow_run_id: str) -> str:
    """The id of the MLflow run that the Prefect flow run ``flow_run_id`` opened (its ``prefect.flow_run_id``
    tag), in any experiment. Raises LookupError when there is none."""
    for run_id in flow_run_runs(flow_run_id, max_results=1):
        return run_id
    raise LookupError(f"no MLflow run in {tracking_uri()} was logged by Prefect flow run {flow_run_id}")


def flow_run_runs(flow_run_id: str, running_only: bool = False, max_results: int = 1000) -> list[str]:
    """The ids of the MLflow runs, in any experiment, that Prefect flow run ``flow_run_id`` opened (its
    ``prefect.flow_run_id`` tag); with ``running_only``, those still RUNNING."""
    status = " and attributes.status = 'RUNNING'" if running_only else ""
    query = f"tags.`prefect.flow_run_id` = '{check_prefect_id(flow_run_id, 'flow run')}'{status}"
    return [run.info.run_id for run in search_all_runs(query, max_results)]


def search_all_runs(query: str, max_results: int = 1000) -> list[Any]:
    """The runs, in any experiment, that match the filter ``query``."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, query, max_results=max_results) if experiments else []


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
    """What a run recorded, for the tasks, tests and the CLI."""

    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    experiment: str = ""  # its name, when read by find_run


def _record(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(info.run_id, info.status, dict(data.params), dict(data.metrics), dict(data.tags))


def get_run(run_id: str) -> RunRecord:
    """Read a run back."""
    return _record(MlflowClient().get_run(run_id))


def child_runs(parent_run_id: str) -> list[RunRecord]:
    """Every run nested under ``parent_run_id``, oldest first."""
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    return [_record(r) for r in runs]
