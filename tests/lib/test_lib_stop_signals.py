"""The stop handler's last resort, in a real process with a real signal: a stop that has not ended the process
within its budget ends it at once, saying what it leaves (the run to continue) when the outer layers noted it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

# A process that installs the handler with a short budget, holds the stop back (as an MLflow call stuck in its
# retries does), tells the test it is ready, and never reaches a safe point.
STUCK = textwrap.dedent(
    """
    import sys, time
    from deeprnn.training import stop_signals

    stop_signals.handle_stop_signals(seconds=1.0)
    stop_signals.note_what_a_stop_leaves(sys.argv[1] or None)
    with stop_signals.held():
        print("ready", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("note", ["MLflow run abc: continue it with `deeprnn run --resume abc`", ""])
def test_a_stop_past_its_budget_ends_the_process_and_says_what_it_leaves(note: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, note], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - sent < 10
    lines = err.strip().splitlines()
    assert lines[-1].startswith("deeprnn: SIGINT: the run did not stop within 1 s; stopped at once")
    if note:
        assert lines[-1].endswith(f"({note})")
    else:
        assert lines[-1].endswith("stopped at once")
    assert "Traceback" not in err
