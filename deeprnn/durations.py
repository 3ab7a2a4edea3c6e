"""Durations as people write them: ``90s``, ``2m``, ``1h30m``, ``1.5h`` or a plain number of seconds."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s|ms)?", re.IGNORECASE)
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}


def parse_duration(value: object) -> object:
    """Seconds (a float) for a duration text such as ``"2m"``, ``"90s"``, ``"1h30m"`` or ``"45"``.

    Numbers pass through unchanged (seconds), as does anything else pydantic should reject itself; an empty
    text or ``"0"`` / ``"off"`` / ``"none"`` mean no budget (None). Raises ``ValueError`` for a text that is not
    a duration, naming the forms it takes.
    """
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("", "0", "off", "none"):
        return None
    pos, total, units = 0, 0.0, []
    for match in _PART.finditer(text):
        if match.start() != pos and text[pos : match.start()].strip():
            break
        unit = match.group(2).lower() if match.group(2) else None
        units.append(unit)
        total += float(match.group(1)) * _SECONDS[unit]
        pos = match.end()
    if not units or text[pos:].strip() or (len(units) > 1 and None in units):
        raise ValueError(f"{value!r} is not a duration: write e.g. 90s, 2m, 1h30m or a number of seconds")
    return total


def format_seconds(seconds: float) -> str:
    """A budget as the user would write it: ``"2m"``, ``"90s"``, ``"1h30m"``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{sec}s" if sec or s == 0 else ""]
    return "".join(parts)
