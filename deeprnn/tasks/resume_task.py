"""Prefect task that prepares ``deeprnn run --resume RUN_ID``: find the run and its last checkpoint, and work
out the configuration it continues with."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from deeprnn.config import RunConfig, overrides_dict
from deeprnn.ops import failures as ops_failures
from deeprnn.tasks.train_task import Logger
from deeprnn.tracking import run_checkpoints, runs, store
from deeprnn.training import checkpoint, resume

CHECKPOINT_ARTIFACT = run_checkpoints.CHECKPOINT_ARTIFACT  # f"checkpoints/{resume.LAST}"


@task(name="prepare-resume", cache_policy=NO_CACHE)
def prepare_resume(
    run_id: str,
    runs_dir: str,
    experiment: Optional[str],
    data: BaseModel | dict[str, Any] | None = None,
    model: BaseModel | dict[str, Any] | None = None,
    train: BaseModel | dict[str, Any] | None = None,
    sample: BaseModel | dict[str, Any] | None = None,
) -> tuple[RunConfig, str]:
    """Put the run's last checkpoint in its run folder (from MLflow if the local copy is gone) and return the
    configuration stored in it, with the allowed overrides applied, and the run's experiment.

    Refuses, before anything is changed: an id that is not a run here, an experiment other than the run's,
    overrides that contradict the checkpoint, and a FINISHED run that would have nothing left to train (its
    epochs, or the step or time budget it stopped on, not raised).
    """
    logger = get_run_logger()
    resume.check_run_id(run_id)
    store.check_reachable()
    run = runs.find_run(run_id)
    if experiment and experiment != run.experiment:
        raise resume.ResumeError(f"run {run_id} belongs to experiment {run.experiment!r}, not {experiment!r}")
    saved = _load_checkpoint(run_id, resume.run_folder(runs_dir, run_id) / resume.LAST, run.tags, logger)
    state = saved.get("trainer_state") or {}
    steps, seconds = int(state.get("step") or 0), float(state.get("train_seconds") or 0.0)
    overrides = overrides_dict(data, model, train, sample)
    config = resume.resume_config(saved["config"], overrides, saved["epoch"], steps, seconds)
    if run.status == "FINISHED":
        stored = RunConfig.model_validate(saved["config"]).train
        done = resume.Finished(run.tags.get("deeprnn.stop_reason", ""), saved["epoch"], steps, stored.time_budget)
        left = config.train
        refusal = resume.nothing_left(run_id, done, left.epochs, left.max_steps, left.time_budget)
        if refusal:
            raise resume.ResumeError(refusal)
    logger.info("checkpoint at epoch %d; continuing to epoch %d", saved["epoch"], config.train.epochs)
    return config, run.experiment


def _load_checkpoint(run_id: str, last: Path, tags: dict[str, str], logger: Logger) -> dict[str, Any]:
    """The run's last checkpoint: the local file when it matches its digest, else the MLflow copy (which then
    replaces it). A run with neither is refused in one line (``ResumeError``) that says, from the run's
    ``tags``, whether it never logged one or its files are gone."""
    damaged: ValueError | None = None
    if last.is_file():
        try:
            saved = checkpoint.load(last)  # digest checked; weights only: a tampered file runs no code
        except ValueError as exc:
            damaged = exc
            logger.warning("%s; taking the MLflow copy (%s) instead", exc, CHECKPOINT_ARTIFACT)
        else:
            logger.info("resuming MLflow run %s from %s", run_id, last)
            return saved
    else:
        logger.info("no local checkpoint at %s: fetching %s from the MLflow run", last, CHECKPOINT_ARTIFACT)
    try:
        return run_checkpoints.fetch_checkpoint(run_id, last)
    except FileNotFoundError:
        if damaged is not None:  # its own kind (a refused pickle stays one), saying that MLflow has no copy
            kind = type(damaged) if ops_failures.is_expected(damaged) else resume.ResumeError
            raise kind(f"{damaged}, and MLflow run {run_id} has no copy of it") from None
        raise resume.ResumeError(resume.no_checkpoint(run_id, tags, last)) from None
