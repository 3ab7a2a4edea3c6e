"""A study's journal file, checked before Optuna reads it and repaired only where nothing is lost.

Optuna's journal is one JSON record a line, appended under a lock file. A crash while a record is written
(power cut, disk full) leaves the last line cut short, without its newline: Optuna's reader skips it, but its
next write lands on the cut line, gluing two records into one line that is no JSON; from then on the study
cannot be read, and Optuna's error names no file. So:

- ``check_journal`` reads every record first: a record that is no JSON before the last line is damage, refused
  naming the file, the line and what to do; a last line without its newline is a torn record, tolerated
  (it may also be a record another process is writing right now);
- ``drop_torn_record``, called only once a sweep has decided to run, cuts a torn last record off under
  Optuna's own lock (so no record being written is cut) and says so. Optuna never read that record, so
  the study is the same without it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class JournalDamagedError(ValueError):
    """A study journal holds a record that is not JSON before its last line: Optuna cannot read it."""


@dataclass(frozen=True)
class JournalCheck:
    """What ``check_journal`` found: the complete records, and whether the last one is cut short."""

    records: int
    torn: bool


def check_journal(path: Path) -> JournalCheck:
    """Read every record of the journal at ``path`` (none when it does not exist); ``JournalDamagedError``
    naming the file, the first damaged line and what to do when a complete line is not a JSON record."""
    if not path.exists():
        return JournalCheck(0, False)
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # what follows the last newline: nothing, unless the last record is cut short
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or bytes that are no UTF-8
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            keep = f"head -n {number - 1} {path} > KEPT.journal" if number > 1 else "nothing before it to keep"
            raise JournalDamagedError(
                f"the study journal {path} is damaged: line {number} of {len(lines) + bool(tail)} is no record "
                f"({why}), so Optuna cannot read the study. Restore the file from a backup, or keep the "
                f"{number - 1} records before it ({keep}) and give --storage that file"
            ) from None
    return JournalCheck(len(lines), bool(tail))


def drop_torn_record(path: Path) -> str | None:
    """Cut a torn last record (a line without its newline) off the journal at ``path``, holding Optuna's lock
    on the file; returns the warning to show, or ``None`` when there was nothing to cut."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.exists():
        return None
    lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's JournalFileBackend writes under
    lock.acquire()
    try:
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1  # 0 when no record is complete
        if keep == len(data):
            return None
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    return (
        f"the study journal {path} ended in a record cut short ({len(data) - keep} bytes, a crash while it was "
        "written): dropped it; Optuna had never read it, so the study is unchanged"
    )
