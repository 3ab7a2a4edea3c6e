"""Passwords out of every log line and error message, whoever writes them.

deeprnn masks the URLs it prints itself (``deeprnn.data.urls``), but MLflow quotes its tracking URL whole, the
password included, in the errors it raises once a tracking server goes away mid-run ("API request to
http://user:password@host/api/2.0/mlflow/... failed with exception ..."): in its own warnings, in the
exceptions Prefect logs with their tracebacks, and in the one-line error the command prints. ``scrub`` replaces
the password of every credentialed URL in play with ``***``; ``scrub_record`` does the same to a log record
(its message with the arguments folded in, its traceback, its stack), and ``scrub_log_handlers`` installs it on
every handler that writes somewhere: the console's, Prefect's API log handler (the dashboard's logs), MLflow's.

The URLs in play are read from the environment each time, so a URL set later (the sweep's ``--storage``,
handed to its flow as ``DEEPRNN_OPTUNA_STORAGE``) is covered too. With no password in any of them, a record
passes untouched after three environment lookups and a look at each URL found.
"""

from __future__ import annotations

import functools
import logging
import os

from deeprnn.data.urls import has_password, hide_password

# Where a credentialed URL may come from: MLflow's tracking store, the Optuna study's storage (the sweep's
# ``--storage`` lands here too), the Prefect server's own database.
URL_VARIABLES = ("MLFLOW_TRACKING_URI", "DEEPRNN_OPTUNA_STORAGE", "PREFECT_API_DATABASE_CONNECTION_URL")


def urls_in_play() -> tuple[str, ...]:
    """The URLs named by ``URL_VARIABLES`` that carry a password (or an http(s) token as user name)."""
    urls = (os.environ.get(name) for name in URL_VARIABLES)
    return tuple(url for url in urls if url and has_password(url))


def scrub(text: str) -> str:
    """``text`` with each credentialed URL in play masked and its password, wherever it appears, ``***``."""
    return functools.reduce(hide_password, urls_in_play(), text)


_TRACEBACKS = logging.Formatter()  # how a record's traceback is written when its handler's formatter has not yet


def scrub_record(record: logging.LogRecord) -> bool:
    """A log filter: rewrite ``record`` so that no password of a URL in play is left in it; never drops one."""
    if not urls_in_play():
        return True
    message = record.getMessage()
    shown = scrub(message)
    if shown != message:
        record.msg, record.args = shown, None  # the arguments folded in: one of them held the password
    if record.exc_info and not record.exc_text:
        # Written here, once, so that every handler's formatter reuses the scrubbed text.
        record.exc_text = _TRACEBACKS.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    return True


def scrub_log_handlers() -> None:
    """Install ``scrub_record`` on the root logger's handlers and on those of every logger that has its own
    (Prefect's console and API handlers, MLflow's console handler), once each. A handler filter sees the
    records of child loggers too, which a logger's filter would not."""
    loggers = [logging.getLogger()]
    loggers += [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            handler.addFilter(scrub_record)  # a handler keeps one of each filter
