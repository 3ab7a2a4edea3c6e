"""Stopping a run on SIGINT or SIGTERM as a normal event: at a safe point, with what was done kept.

A command that runs the pipeline installs ``handle_stop_signals``. The first signal records itself; where no
block holds it back, it raises ``StopRequested`` at once (a stage that is not training is abandoned).
Training holds it back (``held``) and polls ``requested`` at each step boundary it reports from: it writes a
checkpoint there and raises ``StopRequested`` itself. MLflow calls hold it back too, so no store is left
locked mid-write. A second signal ends the process at once, and so does a stop that has not finished within
``STOP_SECONDS`` of the first signal.

``StopRequested`` is a ``KeyboardInterrupt``: everything that already treats Ctrl-C as "stopped by the user"
(MLflow's KILLED status, Prefect's flow engine) treats both signals alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Iterator

STOP_SECONDS = 9.0  # the whole stop, from the first signal to the process's exit, within this
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run. The layers it passes through add what the user is told: the MLflow
    run it stopped and whether that run has a checkpoint to resume from."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_id: str | None = None
        self.checkpoint: Path | str | None = None  # the checkpoint kept (local file or MLflow artifact)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        """``SIGINT`` or ``SIGTERM``."""
        return signal.Signals(self.signum).name


@dataclass
class _State:
    installed: bool = False
    signum: int | None = None
    seconds: float = STOP_SECONDS  # this command's budget for a whole stop (``handle_stop_signals``)
    holds: int = 0  # blocks holding a stop back: the outermost raises it when it ends, training polls it
    stopped: StopRequested | None = None  # how the run stopped, kept for the command (``remember``)
    leaves: str | None = None  # what a stop cut short leaves, for its last line (``note_what_a_stop_leaves``)


_STATE = _State()


def installed() -> bool:
    """Whether this process stops through ``handle_stop_signals`` (a ``deeprnn`` command)."""
    return _STATE.installed


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _STATE.signum


def remember(exc: StopRequested) -> None:
    """Keep how the run stopped for the command to report: Prefect's flow engine turns a flow that ends
    Cancelled into its own ``CancelledRun`` error, without the ``StopRequested`` behind it."""
    _STATE.stopped = exc


def remembered() -> StopRequested | None:
    """The ``StopRequested`` that ended the run, when one was kept (``remember``)."""
    return _STATE.stopped


def note_what_a_stop_leaves(text: str | None) -> None:
    """What a stop that has to end the process at once leaves behind, said on its last line (the outer layers
    know the run: e.g. which MLflow run and how to continue it); ``None`` forgets it."""
    _STATE.leaves = text


def _exit_now(signum: int, why: str) -> None:
    leaves = f" ({_STATE.leaves})" if _STATE.leaves else ""
    # os.write: no Python buffering or locks that the interrupted main thread may hold.
    os.write(2, f"deeprnn: {why}; stopped at once{leaves}\n".encode())
    os._exit(128 + signum)


def _watchdog(state: _State, signum: int, seconds: float) -> None:
    time.sleep(seconds)
    if state is _STATE:  # still this process's stop, not one a test has since replaced
        _exit_now(signum, f"{signal.Signals(signum).name}: the run did not stop within {seconds:.0f} s")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _STATE.signum is not None:
        _exit_now(signum, f"second stop signal ({signal.Signals(signum).name})")
    _STATE.signum = signum
    threading.Thread(
        target=_watchdog, args=(_STATE, signum, _STATE.seconds), name="deeprnn-stop-watchdog", daemon=True
    ).start()
    if _STATE.holds == 0:
        raise StopRequested(signum)


def handle_stop_signals(seconds: float | None = None) -> None:
    """Install the stop handler for SIGINT and SIGTERM (main thread only; elsewhere nothing happens); a stop
    that has not ended the process ``seconds`` (default ``STOP_SECONDS``) after the first signal ends it at once."""
    if threading.current_thread() is not threading.main_thread():
        return
    _STATE.seconds = STOP_SECONDS if seconds is None else seconds
    _STATE.installed = True
    reassert()


def reassert() -> None:
    """Put the stop handler (back) on both signals, where something replaced it (Prefect's flow engine installs
    its own SIGTERM handler for every flow run); no effect in a process that did not install it."""
    if _STATE.installed and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_signal)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold a stop signal back for the block: the outermost held block raises ``StopRequested`` when it ends
    without an error of its own. Inside, code may poll ``requested`` and stop sooner."""
    _STATE.holds += 1
    try:
        yield
    finally:
        _STATE.holds -= 1
    if _STATE.holds == 0 and _STATE.signum is not None:
        raise StopRequested(_STATE.signum)
