"""``deeprnn.ops.password_scrub``: no password of a URL in play survives in a log record (message, arguments,
traceback, stack) written by any handler it is installed on, nor in the text the command prints."""

from __future__ import annotations

import io
import logging
import sys
from typing import Iterator

import pytest

from deeprnn.ops.password_scrub import URL_VARIABLES, scrub, scrub_log_handlers, scrub_record, urls_in_play

TRACKING = "http://tracker:tr%40ck-pw@127.0.0.1:5000"
STORAGE = "postgresql+psycopg://deeprnn:st0rage-pw@db-host:5432/optuna"
# The error MLflow raises once its retries against a tracking server that went away are spent.
MLFLOW_ERROR = (
    f"API request to {TRACKING}/api/2.0/mlflow/runs/update failed with exception HTTPConnectionPool("
    "host='127.0.0.1', port=5000): Max retries exceeded with url: /api/2.0/mlflow/runs/update"
)


@pytest.fixture
def urls(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in URL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING)
    monkeypatch.setenv("DEEPRNN_OPTUNA_STORAGE", STORAGE)


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own whose one handler writes to a string, with the filter installed by the installer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("deeprnn-test.scrub")
    log.addHandler(handler)
    log.propagate = False
    scrub_log_handlers()
    yield log, out
    log.removeHandler(handler)


def test_scrub_masks_each_url_and_its_password_written_out_or_decoded(urls: None) -> None:
    text = scrub(f"{MLFLOW_ERROR}; password tr@ck-pw; storage {STORAGE}; a bare st0rage-pw")
    assert "tr%40ck-pw" not in text and "tr@ck-pw" not in text and "st0rage-pw" not in text
    assert "http://tracker:***@127.0.0.1:5000/api/2.0/mlflow/runs/update" in text
    assert "deeprnn:***@db-host:5432/optuna" in text


def test_urls_without_a_password_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in URL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DEEPRNN_OPTUNA_STORAGE", "sqlite:///optuna.db")
    assert urls_in_play() == ()
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value %s", ("http://u:p@h",), None)
    assert scrub_record(record) and record.args == ("http://u:p@h",)  # untouched, args not folded


def test_a_url_set_later_is_covered(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    later = "postgresql://prefect:l4ter-pw@127.0.0.1/prefect"
    assert scrub(later) == later
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", later)
    assert scrub(later) == "postgresql://prefect:***@127.0.0.1/prefect"


def test_records_lose_the_password_in_arguments_traceback_and_stack(
    urls: None, logger: tuple[logging.Logger, io.StringIO]
) -> None:
    log, out = logger
    log.warning("Failed to get mlflow run: %s", MLFLOW_ERROR)
    try:
        raise RuntimeError(MLFLOW_ERROR)
    except RuntimeError:
        log.exception("Task run failed with exception: %r", sys.exc_info()[1], stack_info=True)
    written = out.getvalue()
    assert "tr%40ck-pw" not in written and "tr@ck-pw" not in written
    assert written.count("http://tracker:***@127.0.0.1:5000/api/2.0/mlflow/runs/update") == 3  # twice the message
    assert "Traceback (most recent call last)" in written and "Stack (most recent call last)" in written


def test_the_installer_covers_root_and_own_handlers_once(
    urls: None, logger: tuple[logging.Logger, io.StringIO]
) -> None:
    log, _ = logger
    scrub_log_handlers()
    handler = next(h for h in log.handlers if type(h) is logging.StreamHandler)  # pytest adds its own too
    assert handler.filters.count(scrub_record) == 1
    for root_handler in logging.getLogger().handlers:
        assert scrub_record in root_handler.filters
