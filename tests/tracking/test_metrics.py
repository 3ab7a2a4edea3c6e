"""deeprnn.tracking.metrics against a real local store: curves sent in batches MLflow accepts, one point per step also
after a resume, epoch histories read back, final metrics logged once."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from deeprnn.tracking import metrics, runs
from deeprnn.training.progress import EpochStats, StepStats


def _steps(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def _epoch(epoch: int, heldout: float | None = None) -> EpochStats:
    return EpochStats(
        epoch,
        train_perplexity=100.0 / epoch,
        tokens_per_sec=1000.0 + epoch,
        seconds=1.0,
        lr=0.5,
        heldout_perplexity=heldout,
    )


def test_queued_metrics_go_in_batches_of_at_most_1000_when_flushed(
    experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    logger = metrics.MetricLogger(run_id, flush_seconds=3600)
    sent: list[int] = []
    store = type(logger._client._tracking_client.store)  # what each request to the store goes through
    real = store.log_batch

    def counted(self: object, run_id: str, metrics: list, **kwargs: object) -> None:  # the real call, its size noted
        sent.append(len(metrics))
        real(self, run_id=run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(store, "log_batch", counted)
    for e in range(1, 701):
        logger.add_epoch(_epoch(e))  # 3 metrics each: 2,100 in all
    assert sent == [] and _steps(run_id, "lr") == []  # queued, not sent
    logger.flush()
    assert sent == [1000, 1000, 100]
    assert [s for s, _ in _steps(run_id, "train_perplexity")] == list(range(1, 701))
    logger.flush()
    assert sent == [1000, 1000, 100]  # nothing left to send


def test_a_logger_sends_on_its_own_once_its_interval_has_passed(experiment: str) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    logger = metrics.MetricLogger(run_id, flush_seconds=0.0)
    logger.add_epoch(_epoch(1, heldout=9.5))
    assert _steps(run_id, "heldout_perplexity") == [(1, 9.5)]


def test_a_resumed_run_keeps_one_point_per_step(experiment: str) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    first = metrics.MetricLogger(run_id)
    for e in (1, 2, 3):
        first.add_epoch(_epoch(e))
    first.add_step(StepStats(30, 100, 3, 5, 10, 10, 7.0, 500.0, None))
    first.flush()
    again = metrics.MetricLogger(run_id, resuming=True)  # resumed from epoch 1: trains 2 and 3 again
    for e in (2, 3, 4):
        again.add_epoch(EpochStats(e, 1.0, 1.0, 1.0, 0.1))
    again.add_step(StepStats(30, 100, 3, 5, 10, 10, 1.0, 1.0, None))  # step 30 already there
    again.add_step(
        StepStats(40, 100, 4, 5, 10, 10, math.inf, 1.0, None, heldout_perplexity=3.0)
    )  # a diverged report: not a point
    again.flush()
    assert _steps(run_id, "train_perplexity") == [(1, 100.0), (2, 50.0), (3, 100.0 / 3), (4, 1.0)]
    assert _steps(run_id, "step_train_perplexity") == [(30, 7.0)]
    assert _steps(run_id, "step_heldout_perplexity") == [(40, 3.0)]


def test_the_epoch_history_reads_back_what_was_logged(experiment: str) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    logger = metrics.MetricLogger(run_id)
    for e in (1, 2, 3, 4):
        logger.add_epoch(_epoch(e, heldout=20.0 - e if e % 2 == 0 else None))
    logger.flush()
    history = metrics.epoch_history(run_id, upto=3)
    assert history == [
        EpochStats(1, 100.0, 1001.0, 0.0, 0.5, None),
        EpochStats(2, 50.0, 1002.0, 0.0, 0.5, 18.0),
        EpochStats(3, 100.0 / 3, 1003.0, 0.0, 0.5, None),
    ]
    assert metrics.epoch_history(runs.create_run(experiment, "empty", {}, {}), upto=3) == []


def test_final_metrics_logged_once_add_no_second_point(experiment: str) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    metrics.log_metrics(run_id, {"test_perplexity": 5.0, "val_perplexity": None}, step=3)
    metrics.log_metrics_once(run_id, {"test_perplexity": 5.0, "val_perplexity": None})
    assert _steps(run_id, "test_perplexity") == [(3, 5.0)] and _steps(run_id, "val_perplexity") == []
    metrics.log_metrics_once(run_id, {"test_perplexity": 4.0})
    assert _steps(run_id, "test_perplexity") == [(0, 4.0), (3, 5.0)]
