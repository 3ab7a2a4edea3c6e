"""Continuing an interrupted run: which configuration it continues with, and where its files live.

A resumed run keeps the configuration stored in its checkpoint. Settings that only say how or where to run
may change (``RESUMABLE``); everything that shapes the model or its training trajectory may not, because the
metric history and the weights already logged were produced with it. ``epochs`` may be raised, never lowered
below the epochs already done; ``max_steps`` likewise, and a checkpoint taken inside an epoch continues
from the minibatch after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeprnn.config import RunConfig
from deeprnn.durations import format_duration
from deeprnn.presets import merge

if TYPE_CHECKING:  # annotations only: checking a run id (the CLI, before anything starts) needs no torch
    from deeprnn.model import RNNLM
    from deeprnn.training.loop import Trainer

# The files of a run's folder: the resumable checkpoint (weights, optimizer, RNG and position, rewritten at
# every checkpoint) and the selected weights the run reports and logs.
LAST = "last.pt"
MODEL = "model.pt"

# Flat keys (as in ``RunConfig.flat``) a resumed run may change.
RESUMABLE = frozenset(
    f"train.{name}"
    for name in (
        "epochs max_steps time_budget device timeout_minutes checkpoint_every checkpoint_every_steps "
        "checkpoint_every_minutes log_every"
    ).split()
)
_RUN_ID = re.compile(r"^[0-9A-Za-z]{1,64}$")
# MLflow tags that show a run logged a resumable checkpoint at some point: the one set at every upload, the
# stop note of a run stopped with one, the mark of an earlier resume (it started from one).
CHECKPOINT_TAG = "deeprnn.checkpoint"
_STOP_TAG, _RESUMED_TAG = "deeprnn.stopped", "deeprnn.resumed_at_epoch"
# Why training ended (tag ``deeprnn.stop_reason``); each of these writes a last checkpoint as it ends.
TRAINING_ENDS = ("epochs", "max_steps", "time_budget", "early_stopping")


class ResumeError(ValueError):
    """A run cannot be resumed as asked; the message says what to change."""


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a plain MLflow run id (letters and digits only).

    The id names a local folder, so anything with separators or dots (``../x``) is refused rather than
    allowed to point outside the runs folder.
    """
    if not _RUN_ID.match(run_id or ""):
        raise ResumeError(
            f"{run_id!r} is not an MLflow run id (32 hexadecimal characters, as printed by `deeprnn run`)"
        )
    return run_id


@dataclass(frozen=True)
class Finished:
    """Where a FINISHED run's training ended: why (``deeprnn.stop_reason``), the epochs and steps done (0 when
    not known), and the time budget it ran under (seconds, None for none)."""

    stop_reason: str
    epochs: int = 0
    steps: int = 0
    budget: float | None = None


def nothing_left(run_id: str, done: Finished, epochs: int, max_steps: int | None, budget: float | None) -> str | None:
    """Why a FINISHED run continued with ``epochs``, ``max_steps`` and ``budget`` (seconds) would train nothing,
    naming what to give instead; None when something is left to train. Epochs count whatever the run stopped
    on; a step or time budget only when the run stopped on it (what was done of it is then all of it)."""
    if done.epochs and epochs <= done.epochs:
        what, give = f"its {done.epochs} epochs", f"--epochs above {done.epochs}"
    elif done.stop_reason == "max_steps" and max_steps is not None and max_steps <= done.steps:
        what, give = f"its step budget ({done.steps:,} steps)", f"--max-steps above {done.steps}"
    elif done.stop_reason == "time_budget" and budget is not None and budget <= (done.budget or 0.0):
        spent = format_duration(done.budget or 0.0)
        what = f"its time budget ({spent})"
        give = f"a longer --time-budget (above {spent}), or --time-budget off and --epochs,"
    else:
        return None
    return f"MLflow run {run_id} already FINISHED {what}, so nothing is left to train: give {give} to train it further"


def no_checkpoint(run_id: str, tags: dict[str, str], local: Path) -> str:
    """Why run ``run_id`` cannot be resumed when neither ``local`` nor its MLflow copy exists: it never logged
    a checkpoint, or (its ``tags`` show it did) the files are gone."""
    ended = tags.get(_STOP_TAG, "").startswith("continue with") or tags.get("deeprnn.stop_reason") in TRAINING_ENDS
    if CHECKPOINT_TAG in tags or _RESUMED_TAG in tags or ended:
        return (
            f"MLflow run {run_id} logged a checkpoint, but its files are gone: neither {local} nor the run's "
            "artifact checkpoints/last.pt exists any more; start a new run"
        )
    return (
        f"MLflow run {run_id} has no checkpoint to resume from: it stopped before its first checkpoint; start a new run"
    )


def run_folder(runs_dir: str | Path, run_id: str) -> Path:
    """The run's local folder (checkpoints): ``<runs_dir>/<run_id>``, never outside ``runs_dir``."""
    return Path(runs_dir).resolve() / check_run_id(run_id)


def differences(stored: RunConfig, given: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (stored, given)`` for every setting that differs and may not change on resume."""
    before, after = stored.flat(), given.flat()  # JSON values: URLs compared without credentials
    return {k: (before.get(k), v) for k, v in after.items() if v != before.get(k) and k not in RESUMABLE}


def resume_config(
    stored: dict[str, Any],
    overrides: dict[str, dict[str, Any]],
    epochs_done: int,
    steps_done: int = 0,
    seconds_done: float = 0.0,
) -> RunConfig:
    """The configuration a resumed run continues with: the checkpoint's ``stored`` config, plus ``overrides``.

    ``overrides`` (``{section: {field: value}}``, None values ignored) may restate the stored values, change
    the ``RESUMABLE`` ones, or give the corpus URL again with its credentials (checkpoints keep it without).
    Anything else raises ``ResumeError`` naming each setting, its stored value and the value given, and so
    do ``epochs`` below ``epochs_done``, ``max_steps`` below ``steps_done`` (the checkpoint's
    ``trainer_state["step"]``) and a changed time budget no longer than the ``seconds_done`` of training.
    """
    base = RunConfig.model_validate(stored)
    given = {section: {k: v for k, v in values.items() if v is not None} for section, values in overrides.items()}
    config = RunConfig.model_validate(merge(base.model_dump(mode="json"), given))
    conflicts = differences(base, config)
    if conflicts:
        lines = [f"  {key}: the checkpoint has {old!r}, given {new!r}" for key, (old, new) in sorted(conflicts.items())]
        raise ResumeError(
            "a resumed run keeps its checkpoint's configuration; these settings differ:\n"
            + "\n".join(lines)
            + f"\nleave them out (only {', '.join(sorted(RESUMABLE))} may change) or start a new run"
        )
    _check_done(epochs_done, config.train.epochs, "epochs", "--epochs")
    _check_done(steps_done, config.train.max_steps, "steps", "--max-steps")
    budget = config.train.time_budget
    if budget is not None and budget != base.train.time_budget and budget <= seconds_done:
        raise ResumeError(
            f"the checkpoint already has {format_duration(seconds_done)} of training; --time-budget "
            f"{format_duration(budget)} would leave none: give more than {format_duration(seconds_done)}, or off"
        )
    return config


def _check_done(done: int, given: int | None, what: str, option: str) -> None:
    if given is not None and done > given:
        raise ResumeError(
            f"the checkpoint already has {done} {what} done; {option} {given} would undo them: give at least {done}"
        )


def restore_training(data: dict[str, Any], config: RunConfig, model: RNNLM, trainer: Trainer) -> int:
    """Load a resumable checkpoint dict into ``model`` and ``trainer``; returns the epochs already done.

    Refuses (``ResumeError``) a checkpoint from another configuration, one without training state (a final
    ``model.pt``), and one with more epochs (or steps) done than ``config`` asks for.
    """
    conflicts = differences(RunConfig.model_validate(data["config"]), config)
    if conflicts:
        raise ResumeError(
            f"the checkpoint was written with other settings ({', '.join(sorted(conflicts))}): it belongs to "
            "another run; start a new run or resume that one"
        )
    if not data.get("trainer_state"):
        raise ResumeError("the checkpoint holds no training state (a final model, not a resumable last.pt)")
    if data["epoch"] > config.train.epochs:
        raise ResumeError(
            f"the checkpoint has {data['epoch']} epochs done, more than the {config.train.epochs} asked for"
        )
    _check_done(int(data["trainer_state"].get("step") or 0), config.train.max_steps, "steps", "--max-steps")
    model.load_state_dict(data["model_state"])  # weights first: the optimizer state refers to them
    trainer.load_state_dict(data["trainer_state"])
    return trainer.epoch
