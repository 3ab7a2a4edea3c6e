"""MLflow metrics: per-epoch and per-step curves buffered and sent in batches, final metrics, reading a run's
epoch history back (to resume it), and system metrics (CPU, memory, GPU) while training runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Iterator

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from deeprnn.tracking.runs import release_unwound_frames
from deeprnn.training.loop import EpochStats
from deeprnn.training.progress import StepStats

log = logging.getLogger(__name__)


def log_metrics_once(run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
    """Log final metrics, skipping each one the run already holds with this value (a retry's second write
    would add a second point to its history)."""
    held = MlflowClient().get_run(run_id).data.metrics
    log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None and held.get(k) != float(v)}, step)


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


# Seconds between system metric samples: short enough that a run of a few seconds records some.
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_METRICS_INTERVAL = 1.0


@contextlib.contextmanager
def system_metrics(run_id: str, interval: float = SYSTEM_METRICS_INTERVAL) -> Iterator[None]:
    """Log CPU, memory, disk and network use (and GPU use where ``nvidia-ml-py`` finds a GPU) to ``run_id`` as
    ``system/*`` metrics while the block runs, with MLflow's own monitor on a background thread."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, tracking_uri=mlflow.get_tracking_uri())
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
            # One request says which curves the run has (none, for a new run); only those are read back.
            held = self._client.get_run(run_id).data.metrics
            logged = _histories(self._client, run_id, tuple(k for k in _EPOCH_KEYS + STEP_KEYS if k in held))
            self._logged = {k: max(v, default=0) for k, v in logged.items()}

    def add_epoch(self, stats: EpochStats) -> None:
        """Queue one epoch's metrics, with the epoch as the step (skipping steps the run already has)."""
        values = {"train_perplexity": stats.train_perplexity, "tokens_per_sec": stats.tokens_per_sec, "lr": stats.lr}
        self._queue(values, stats.heldout_perplexity, stats.epoch, "")

    def add_step(self, stats: StepStats) -> None:
        """Queue one progress report as ``step_*`` metrics, with the global optimizer step as the step."""
        values = {"train_perplexity": stats.train_perplexity, "tokens_per_sec": stats.tokens_per_sec}
        self._queue(values, stats.heldout_perplexity, stats.step, "step_", finite_only=True)

    def _queue(
        self, values: dict[str, float], heldout: float | None, step: int, prefix: str, finite_only: bool = False
    ) -> None:
        """Queue ``values`` (and ``heldout`` when measured) under ``prefix``, skipping steps the run already has;
        flush when the last send is ``flush_seconds`` old."""
        ts = int(time.time() * 1000)
        if heldout is not None:
            values["heldout_perplexity"] = heldout
        self._buffer += [
            Metric(prefix + k, float(v), ts, step)
            for k, v in values.items()
            if step > self._logged.get(prefix + k, 0) and (math.isfinite(v) or not finite_only)
        ]
        if time.monotonic() - self._last > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Send everything queued (MLflow's client sends it 1,000 metrics per request)."""
        self._client.log_batch(self.run_id, metrics=self._buffer)
        self._buffer, self._last = [], time.monotonic()


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log final (summary) metrics in one call; None values are skipped."""
    ts = int(time.time() * 1000)
    points = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    MlflowClient().log_batch(run_id, metrics=points)
