"""Expected failures: the one place that knows which errors are the user's to fix, and keeps them clean.

A wrong URL, a missing GPU or an unreachable MLflow is not a bug: its message says what to fix, and a Python
traceback only buries it. Prefect logs every exception that ends a task or flow run with its traceback
("Task run failed with exception", "Encountered exception during execution", and for deployment runs
"Engine execution exited with unexpected exception"), to the console and to the flow run's logs in the
dashboard alike. ``quiet_expected_failures`` installs a logging filter on Prefect's run loggers that drops the
traceback from those records when the exception is one of ours; the record itself (with the message) stays.
The ``deeprnn`` command, which prints the message itself, also keeps those records off its console
(``hide_expected_failures_on_console``), so the user reads it once.

The exception itself is not changed: the task and flow still end ``Failed`` with the message as their state
message, retry conditions still see the real exception, a sweep still collects each failed trial's error,
and the ``deeprnn`` command prints ``error: <message>`` once. Any other exception keeps its traceback.
"""

from __future__ import annotations

import logging
import re
import sys

# (module, class) of every error whose message tells the user what to fix. Looked up in ``sys.modules`` only:
# an exception of a class can only exist once its module is loaded, so this never imports anything.
EXPECTED: tuple[tuple[str, str], ...] = (
    ("deeprnn.data.download", "DownloadError"),  # HTTP 4xx/5xx, SHA-1 mismatch, empty/binary/non-UTF-8, bad scheme
    ("deeprnn.data.corpus_stream", "TransientDownloadError"),  # a network or HTTP 5xx fault that outlived its retries
    ("deeprnn.data.prepare", "PrepareError"),  # a text that normalizes to nothing, a word vocabulary too large
    ("deeprnn.device", "DeviceUnavailableError"),
    ("deeprnn.data.batching", "CorpusTooShortError"),
    ("deeprnn.training.divergence", "TrainingDivergedError"),  # a NaN or infinite loss or weight
    ("deeprnn.training.resume", "ResumeError"),
    ("deeprnn.search.space", "SearchSpaceError"),
    ("deeprnn.search.optuna_study", "StudyError"),  # a damaged journal, a study of another search, no storage
    ("deeprnn.training.checkpoint", "UnsafeCheckpointError"),
    ("deeprnn.training.checkpoint", "DamagedCheckpointError"),  # digest mismatch, cut short, weights not finite
    ("deeprnn.training.checkpoint", "CheckpointDiskFullError"),  # the run folder's disk is full
    ("deeprnn.tracking.model_registry", "ArtifactStoreFullError"),  # the artifact store filled while logging the model
    ("deeprnn.tracking.store", "TrackingUnavailableError"),  # also an MLflow store that needs `mlflow db upgrade`
    ("deeprnn.ops.cluster", "ClusterConfigError"),
    ("deeprnn.tasks.sweep_report", "SweepFailedError"),
    ("prefect.task_engine", "TaskRunTimeoutError"),  # the training task ran past its timeout (train.timeout_minutes)
    ("pydantic", "ValidationError"),  # a configuration refused inside a flow (deployment parameters)
)

# Prefect's loggers for run records; the flow engine's own logger reports a deployment run's last exception.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")


def is_expected(exc: BaseException | None) -> bool:
    """True for an error the user can fix from its message: one of ``EXPECTED``, or a ``LookupError`` that
    names a missing run or model (``KeyError`` and ``IndexError`` are bugs, not lookups)."""
    if isinstance(exc, LookupError) and not isinstance(exc, (KeyError, IndexError)):
        return True
    found = (getattr(sys.modules.get(module), name, None) for module, name in EXPECTED)  # only classes loaded
    return isinstance(exc, tuple(cls for cls in found if isinstance(cls, type)))


def message(exc: BaseException) -> str:
    """What the user reads: the expected error's own message, else its type and message."""
    if not is_expected(exc):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TimeoutError):  # Prefect's task timeout: only the training task has one
        return f"the training task ran past its timeout ({exc}); give it longer with --timeout-minutes"
    if isinstance(exc, OSError) and exc.strerror:  # our own OSErrors: the message without "[Errno 28]"
        return exc.strerror
    return str(exc)


EXPECTED_MARK = "deeprnn_expected_failure"  # set on a record whose traceback was dropped
# How Prefect's "Finished in state Failed(...)" records name the exception that failed the task or flow run.
_FAILED_STATE = re.compile(r"encountered an exception:? (\w+): ")


def _carries_expected(record: logging.LogRecord) -> bool:
    return isinstance(record.exc_info, tuple) and is_expected(record.exc_info[1])


_STOPPED_STATE = "Finished in state Cancelled('stopped by SIG"


def drop_expected_traceback(record: logging.LogRecord) -> bool:
    """A log filter: keep a run log record, but without its traceback when it reports an expected error."""
    if _carries_expected(record):
        record.exc_info, record.exc_text = None, None
        setattr(record, EXPECTED_MARK, True)  # the console's filter still knows what the record reports
    if record.levelno > logging.INFO and _STOPPED_STATE in record.getMessage():
        # Prefect logs every final state but Completed at ERROR; a stop on purpose is no error.
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def quiet_expected_failures() -> None:
    """Install the filter on Prefect's run loggers (idempotent). Filters stay when Prefect re-reads its logging
    configuration, so once per process is enough: ``deeprnn/tasks/__init__.py`` calls it."""
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(drop_expected_traceback)  # a logger keeps one of each filter


_INTERRUPTED = "aborted by an interrupt signal"


def hide_expected_failure(record: logging.LogRecord) -> bool:
    """A log filter: drop the run log records that report an expected error (with it attached, or by its class
    in a state), for a console whose command prints it itself."""
    if not record.name.startswith(RUN_LOGGERS):
        return True
    # A stop on purpose (Ctrl-C, SIGTERM): the command says in one line what was kept; Prefect's "Crash
    # detected" records of the interrupted task stay in the dashboard's logs only.
    if getattr(record, EXPECTED_MARK, False) or _carries_expected(record) or _INTERRUPTED in record.getMessage():
        return False
    found = _FAILED_STATE.search(record.getMessage())
    return found is None or found.group(1) not in {"LookupError", *(name for _, name in EXPECTED)}


def hide_expected_failures_on_console() -> None:
    """For the ``deeprnn`` command, which prints an expected error's message itself (once): keep Prefect's
    records of it off the console. Only the console's handlers get the filter: the flow run's logs in the
    Prefect API (the dashboard) keep every record, with its message."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.addFilter(hide_expected_failure)  # a handler keeps one of each filter
