"""Durations as people write them: ``90s``, ``2m``, ``1h30m``, ``1.5h`` or a plain number of seconds; the
time budget they give, which is such a duration or ``off``; and seconds written back as such a text."""

from __future__ import annotations

import contextlib
import math
import re

_NUMBER = r"\d+(?:\.\d+)?"
# A plain number, or one or more numbers each with its unit (repeats add up).
_DURATION = re.compile(rf"{_NUMBER}|(?:{_NUMBER}\s*[hms]\s*)+")
_PART = re.compile(rf"({_NUMBER})\s*([hms]?)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
# A time budget is planned from the throughput measured in its first seconds: below a second there is nothing
# to plan. Thirty days is far beyond any run this pipeline makes.
MIN_BUDGET = 1.0
MAX_BUDGET = 30 * 86400.0
OFF = "off"
DURATION_FORMS = "90s, 2m, 1h30m or 1.5h (units h, m, s; a plain number is seconds)"
# What a time budget takes, as every refusal says it.
BUDGET_FORMS = f"a duration such as {DURATION_FORMS}, from 1 s to 30 days, or off for none"


class DurationError(ValueError):
    """A value that is not a duration (or not a time budget); the message says which forms are taken."""


def parse_duration(value: str) -> float:
    """Seconds for a duration text such as ``"2m"``, ``"90s"``, ``"1h30m"`` or ``"45"``; ``DurationError`` for
    a text that is not a duration, naming the forms it takes."""
    text = value.strip().lower()
    if not _DURATION.fullmatch(text):
        raise DurationError(f"{value!r} is not a duration: write e.g. {DURATION_FORMS}")
    return sum(float(number) * _SECONDS[unit] for number, unit in _PART.findall(text))


def parse_budget(value: object) -> float | None:
    """A time budget in seconds, or None for ``"off"`` (or a Python None: the form's empty field).

    Takes a duration text (``parse_duration``) or a number of seconds, between ``MIN_BUDGET`` and
    ``MAX_BUDGET``. Everything else raises ``DurationError`` naming what is taken: ``0``, ``"0s"``, a blank
    text, a bool, a negative or non-finite number. A zero budget is never taken to mean "no budget", so a
    typo cannot turn a five-minute run into an unbounded one.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == OFF):
        return None
    refused = DurationError(f"{value!r} is not a time budget: give {BUDGET_FORMS}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise refused
    with contextlib.suppress(DurationError):
        seconds = parse_duration(value) if isinstance(value, str) else float(value)
        if MIN_BUDGET <= seconds <= MAX_BUDGET:  # never true of nan, and inf is above
            return seconds
    raise refused


def format_duration(seconds: float | None, *, short: bool = False) -> str:
    """A duration as people write it; ``"?"`` for None, a negative or a non-finite number (a time not known yet).

    By default every unit it has, in whole seconds, as ``parse_duration`` reads it back (a budget as the user
    would write it): ``"2m"``, ``"1m30s"``, ``"1h2m5s"``, ``"0s"``. ``short=True`` keeps the two largest units,
    the second zero-padded, for a time that changes while it is shown (an ETA): ``"45s"``, ``"12m05s"``,
    ``"3h07m"``, ``"2d04h"``.
    """
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if short:  # the two largest units
        for size, unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"), (60, "m", 1, "s")):
            if s >= size:
                return f"{s // size}{unit}{s % size // small:02d}{small_unit}"
        return f"{s}s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((h, "h"), (m, "m"), (sec, "s")) if n) or "0s"
