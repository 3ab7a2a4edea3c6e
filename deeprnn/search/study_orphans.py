"""Trials whose process is gone: an Optuna trial left ``RUNNING`` by a sweep stopped outright (Ctrl-C tears the
Dask workers down mid-trial; SIGKILL, the OOM killer, a power cut end them at once) is marked ``FAIL`` by the
next sweep of the study, so the study neither counts it nor has TPE treat it as a point still being tried.

The rule: a trial is orphaned only when its process is known to be gone.

- Every trial records its owner as the user attr ``deeprnn.owner``: host, process id and that process's
  start time, written right after the trial is asked for. A ``RUNNING`` trial of this host whose process no
  longer exists (or whose pid now belongs to a later process) is orphaned: nothing will ever end it.
- A trial of another host cannot be checked from here. In a database storage every trial also beats
  Optuna's heartbeat; one whose heartbeat stopped for longer than ``GRACE_S`` is failed by Optuna's own
  ``fail_stale_trials``, whichever host ran it. A journal file lives on one machine, so there a trial of
  another host is left alone.
- A ``RUNNING`` trial with no owner recorded (asked by an older version, or killed in the instant between
  being asked for and recording its owner) is left alone too, and reported.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import psutil  # type: ignore[import-untyped]  # no type stubs installed

if TYPE_CHECKING:
    import optuna

OWNER_ATTR = "deeprnn.owner"  # {"host", "pid", "started"} of the process running the trial
REASON_ATTR = "deeprnn.fail_reason"  # why the next sweep failed it
HEARTBEAT_S = 30  # database storages: seconds between two heartbeats of a running trial
GRACE_S = 180  # database storages: a running trial silent for longer than this is failed
# How a gone trial's process went, by whether its pid exists now (then another process holds it).
_GONE_HOW = {True: "is now another process", False: "ended without ending the trial (killed or crashed)"}
_START_SLACK = 2.0  # seconds: a process's start time is a float, recorded a moment after it started


def claim(trial: optuna.Trial) -> None:
    """Record this process as the owner of ``trial``: host, pid and start time (so a reused pid is not taken
    for it)."""
    started = round(psutil.Process().create_time(), 3)  # this process's
    trial.set_user_attr(OWNER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(), "started": started})


def process_alive(pid: int, started: Any) -> bool:
    """True while process ``pid`` of this host exists and, when its start time ``started`` is known (a number, or
    its text), is the same process (not a later one that reuses its pid)."""
    try:
        created: float = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True
    try:
        return abs(created - float(started)) <= _START_SLACK
    except (TypeError, ValueError):  # no start time recorded
        return True


@dataclass(frozen=True)
class Cleanup:
    """What ``fail_orphaned_trials`` did: the trials it failed (number, why) and the running ones it left."""

    failed: list[tuple[int, str]]
    left_running: list[int]  # alive, of another host, or with no owner recorded
    no_owner: list[int]  # of those, the ones with no owner recorded


def fail_orphaned_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> Cleanup:
    """Mark the study's orphaned trials (see the module's rule) ``FAIL``, each with its reason as the user
    attr ``deeprnn.fail_reason``; ``storage`` is the one ``study`` was opened on."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    failed: list[tuple[int, str]] = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Known to be gone: an owner recorded, of this host, whose process is no longer there.
        owner = trial.user_attrs.get(OWNER_ATTR)
        if not isinstance(owner, dict) or owner.get("host") != host or not isinstance(owner.get("pid"), int):
            continue
        pid = owner["pid"]
        if process_alive(pid, owner.get("started")):
            continue
        reason = f"process gone: pid {pid} on {host} {_GONE_HOW[psutil.pid_exists(pid)]}"
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, REASON_ATTR, reason)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:  # another sweep starting at the same moment failed it first
            continue
        failed.append((trial.number, reason))
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings(action="ignore"):  # Optuna marks the heartbeat "experimental"
        optuna.storages.fail_stale_trials(study)  # a no-op but for a database storage with a heartbeat
    still = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    grace = getattr(storage, "grace_period", None) or GRACE_S
    silent = f"no heartbeat for over {grace} s: its process is gone"
    failed += [(n, silent) for n in sorted(running - {t.number for t in still})]
    return Cleanup(failed, [t.number for t in still], [t.number for t in still if OWNER_ATTR not in t.user_attrs])


@contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """While the block runs, beat ``trial``'s heartbeat every ``HEARTBEAT_S`` seconds when its storage has one
    (database storages); a missed beat (the database briefly unreachable) is tried again at the next."""
    storage = trial.storage
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if not interval:
        yield
        return
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    stop = threading.Event()
    # The first beat before the block: a trial with no beat at all is never stale to Optuna.
    storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    def beat() -> None:
        while not stop.wait(interval):
            with suppress(Exception):  # the next beat tries again; the grace period allows for it
                storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]

    thread = threading.Thread(target=beat, name=f"optuna-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
