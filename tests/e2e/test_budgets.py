"""Step budgets through the real flow (embedded Prefect, sqlite MLflow, the book over HTTP from 127.0.0.1):
a run stopped by --max-steps inside an epoch logs step-wise curves and resumes from that minibatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from mlflow.tracking import MlflowClient

from deeprnn.flows.train_flow import train_lm
from deeprnn.training import checkpoint

pytestmark = pytest.mark.e2e


def _steps(run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def test_a_step_budget_stops_inside_an_epoch_and_the_resumed_run_ends_like_an_uninterrupted_one(
    workdir: Path, book_url: str
) -> None:
    data = {"url": book_url, "sha1": BOOK_SHA1}
    train = {"device": "cpu", "epochs": 3, "eval_every_steps": 5, "checkpoint_every_steps": 5}
    straight = train_lm(preset="smoke", data=data, train=train, runs_dir="runs")
    per_epoch = _steps(straight.run_id, "train_perplexity")
    assert per_epoch == [1, 2, 3]  # per-epoch curves as always, one point per epoch
    total = _steps(straight.run_id, "step_train_perplexity")[-1]
    budget = 20  # the smoke preset's epoch has 15 or so minibatches: this stops inside epoch 2

    cut = train_lm(preset="smoke", data=data, train={**train, "max_steps": budget}, runs_dir="runs")
    run_id = cut.run_id
    assert _steps(run_id, "train_perplexity") == [1]  # the epoch cut short is not a per-epoch point
    assert _steps(run_id, "step_heldout_perplexity") == [5, 10, 15, 20]  # step = global step
    assert _steps(run_id, "step_train_perplexity")[-1] == budget
    state = checkpoint.load(Path("runs") / run_id / "last.pt")["trainer_state"]
    assert state["step"] == budget and state["position"]["epoch"] == 2

    resumed = train_lm(resume_run_id=run_id, runs_dir="runs", train={"max_steps": 10_000})
    assert resumed.run_id == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["deeprnn.resumed_at_step"] == str(budget) and run.data.tags["deeprnn.resumed_at_epoch"] == "1"
    assert _steps(run_id, "train_perplexity") == [1, 2, 3]
    assert _steps(run_id, "step_heldout_perplexity") == sorted(set(range(5, total + 1, 5)) | {total})
    # The same weights, bit for bit, as the run that was never stopped.
    a = checkpoint.load(Path(straight.training.checkpoint))["model_state"]
    b = checkpoint.load(Path(resumed.training.checkpoint))["model_state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
