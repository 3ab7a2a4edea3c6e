"""Hyperparameter search: a space of configuration values and the trials it expands to.

A space maps configuration fields to values::

    model.cell: [lstm, gru]          # a dimension: every trial takes one of these
    model.num_layers: [1, 2]
    lr: [0.5, 1.0, 2.0]              # a bare field name works when only one section has it
    train.epochs: 100                # a single value: the same for every trial
    train.clip_norm: {low: 0.1, high: 10, log: true}   # a range: random search only

Grid search takes every combination of the dimensions, in order; random search draws ``max_trials`` of
them (distinct ones when every dimension is a list) with a seeded generator, so the same seed gives the same
trials. Each trial is a complete ``RunConfig`` (the preset, the user's overrides, then the trial's values),
validated before anything runs. What the trials produce, and their ranking, is ``deeprnn.search.ranking``.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, cast

import numpy as np
from pydantic import ValidationError

from deeprnn.config import SECTIONS, RunConfig, preset_config, section_values
from deeprnn.presets import merge

MAX_TRIALS = 1000  # a guard against a typo that expands to a million training runs
DEFAULT_RANDOM_TRIALS = 10
# Names people use for a field that the config spells differently.
_ALIASES = {
    "hidden_size": "model.num_hiddens",
    "hiddens": "model.num_hiddens",
    "layers": "model.num_layers",
    "learning_rate": "train.lr",
}


class SearchSpaceError(ValueError):
    """The search space or a trial it expands to is not valid; the message says which key and why."""


@dataclass(frozen=True)
class Range:
    """A continuous (or integer) interval for random search, sampled uniformly or log-uniformly."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def draw(self, rng: random.Random) -> float | int:
        """One value from the interval."""
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        if self.integer:
            return min(max(int(round(value)), int(self.low)), int(self.high))
        return float(f"{value:.4g}")  # 4 significant digits: readable in the MLflow UI, plenty for tuning

    @property
    def ends(self) -> list[float | int]:
        """Its two ends, as integers for an integer range."""
        kind = int if self.integer else float
        return [kind(self.low), kind(self.high)]


@dataclass(frozen=True)
class SearchSpace:
    """Varied dimensions (lists or ranges) and fixed values, each keyed by ``section.field``."""

    dims: dict[str, list[Any] | Range]
    fixed: dict[str, Any] = field(default_factory=dict)

    def grid_size(self) -> int | None:
        """How many combinations the lists make; None when a dimension is a range."""
        if any(isinstance(v, Range) for v in self.dims.values()):
            return None
        return math.prod([len(v) for v in self.dims.values() if isinstance(v, list)])

    def describe(self) -> dict[str, Any]:
        """The space as plain JSON-ready data (ranges as ``{low, high, log}``)."""
        ranges = {k: {"low": v.low, "high": v.high, "log": v.log} for k, v in self.dims.items() if isinstance(v, Range)}
        return {**self.dims, **ranges}


def field_path(name: str) -> str:
    """``section.field`` for a field name given as ``section.field``, a bare field name or an option name.

    Raises ``SearchSpaceError`` for an unknown name (suggesting the closest) or a bare name two sections share.
    """
    key = name.strip().replace("-", "_")
    section, _, bare = key.rpartition(".")
    if bare in _ALIASES and section in ("", _ALIASES[bare].split(".")[0]):
        key = _ALIASES[bare]
    paths = [f"{s}.{f}" for s, cls in SECTIONS.items() for f in cls.model_fields]
    if key in paths:
        return key
    matches = [p for p in paths if p.split(".", 1)[1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SearchSpaceError(f"{name!r} is ambiguous: write one of {', '.join(matches)}")
    near = difflib.get_close_matches(key, paths if "." in key else [p.split(".", 1)[1] for p in paths], n=3)
    close = [p for p in paths if p in near or p.split(".", 1)[1] in near]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see `deeprnn presets smoke` for the fields"
    raise SearchSpaceError(f"unknown configuration field {name!r} in the search space{hint}")


def _range(key: str, spec: Mapping[str, Any]) -> Range:
    if not {"low", "high"} <= set(spec) <= {"low", "high", "log"}:
        raise SearchSpaceError(f"{key}: a range is {{low: ..., high: ..., log: true|false}}, got {dict(spec)}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise SearchSpaceError(f"{key}: a range needs numbers with low <= high, got low={low!r} high={high!r}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SearchSpaceError(f"{key}: a log range needs low > 0, got {low}")
    return Range(float(low), float(high), log, integer=isinstance(low, int) and isinstance(high, int))


def parse_space(spec: Mapping[str, Any]) -> SearchSpace:
    """Turn ``{field: list | value | {low, high, log}}`` into a ``SearchSpace`` (names checked, lists
    de-duplicated in order). A list of one value, or a scalar, is fixed rather than varied."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():  # ``{model: {cell: [...]}}`` as well as ``{model.cell: [...]}``
        if key in SECTIONS and isinstance(value, Mapping):
            flat.update({f"{key}.{sub}": sub_value for sub, sub_value in value.items()})
        else:
            flat[str(key)] = value
    dims: dict[str, list[Any] | Range] = {}
    fixed: dict[str, Any] = {}
    for name, value in flat.items():
        key = field_path(name)
        if key in dims or key in fixed:
            raise SearchSpaceError(f"{key} is given twice in the search space")
        if isinstance(value, Mapping):
            dims[key] = _range(key, value)
        elif isinstance(value, (list, tuple)):
            values = [v for i, v in enumerate(value) if v not in value[:i]]
            if not values:
                raise SearchSpaceError(f"{key}: the list of values is empty")
            if len(values) == 1:
                fixed[key] = values[0]
            else:
                dims[key] = values
        else:
            fixed[key] = value
    return SearchSpace(dims, fixed)


def load_space(path: str | Path) -> dict[str, Any]:
    """Read a search space from a YAML (or JSON) file; the error names the file when it is not a mapping."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SearchSpaceError(f"cannot read search space file {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SearchSpaceError(f"search space file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping) or not data:
        raise SearchSpaceError(f"search space file {p} must map configuration fields to values, e.g. 'lr: [0.5, 1]'")
    return dict(data)


def parse_values(text: str) -> list[Any]:
    """``"0.5,1,2"`` -> ``[0.5, 1, 2]``, ``"lstm,gru"`` -> ``["lstm", "gru"]`` (each item read as YAML:
    numbers, ``true``/``false``, ``null``)."""
    import yaml

    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise SearchSpaceError(f"cannot read values {text!r}: give them separated by commas, e.g. 0.5,1,2")
    return [yaml.safe_load(item) for item in items]


def expand(
    space: SearchSpace, random_search: bool = False, max_trials: int | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """The varied values of each trial, in order: the whole grid, or ``max_trials`` random draws.

    Grid search refuses a grid larger than ``max_trials`` (say so rather than silently cutting it) and
    ranges; random search draws distinct combinations when every dimension is a list.
    """
    size = space.grid_size()
    lists = [cast(list[Any], v) for v in space.dims.values()]  # a grid: every dimension is a list
    if not random_search:
        if size is None:
            ranged = [k for k, v in space.dims.items() if isinstance(v, Range)]
            raise SearchSpaceError(f"{', '.join(ranged)}: ranges need random search (--random --max-trials N)")
        limit = min(max_trials or MAX_TRIALS, MAX_TRIALS)
        if size > limit:
            raise SearchSpaceError(
                f"the grid has {size} trials, more than {limit}: use --random --max-trials N to sample it, "
                "or give fewer values"
            )
        return [dict(zip(space.dims, combo)) for combo in itertools.product(*lists)]
    wanted = min(max_trials or DEFAULT_RANDOM_TRIALS, MAX_TRIALS)
    rng = random.Random(seed)
    # A grid whose indices fit numpy's index type: distinct combinations, drawn as indices into the grid without
    # replacement, each the index of a combination of itertools.product(*lists) (the last list varies fastest).
    # A larger grid (over 2**63 points) is drawn a value per dimension, as ranges are: a repeat is then unlikely.
    if size is not None and size <= np.iinfo(np.intp).max:
        picks = rng.sample(range(size), min(wanted, size))
        digits = np.unravel_index(picks, [len(values) for values in lists])
        return [{k: values[i] for k, values, i in zip(space.dims, lists, combo)} for combo in zip(*digits)]
    return [
        {k: v.draw(rng) if isinstance(v, Range) else rng.choice(v) for k, v in space.dims.items()}
        for _ in range(wanted)
    ]


@dataclass(frozen=True)
class Trial:
    """One point of the search: its number, the values it varies and its complete configuration."""

    index: int
    values: dict[str, Any]
    config: RunConfig
    name: str  # a short label for logs and the MLflow UI, e.g. ``trial-2 cell=gru lr=1``


def trial_name(index: int, values: Mapping[str, Any]) -> str:
    """Trial ``index``'s label: ``trial-2 cell=gru lr=1``."""
    return " ".join([f"trial-{index}", *(f"{k.split('.', 1)[1]}={v}" for k, v in values.items())])


def make_trial(
    preset: str, overrides: Mapping[str, Any] | None, space: SearchSpace, index: int, values: Mapping[str, Any]
) -> Trial:
    """Trial ``index`` with the varied ``values``: ``preset``, then ``overrides`` (``{section: {field: value}}``,
    a section may be a section model, whose set fields count, or None), then the space's fixed values, then
    ``values``; ``SearchSpaceError`` saying why when that is not a valid configuration."""
    given = {section: section_values(model) for section, model in (overrides or {}).items() if section_values(model)}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in {**space.fixed, **values}.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    try:
        config = preset_config(preset, merge(given, nested))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        shown = ", ".join(f"{k}={v}" for k, v in values.items()) or "no varied values"
        raise SearchSpaceError(f"trial {index} ({shown}) is not a valid configuration: {problems}") from None
    return Trial(index, dict(values), config, trial_name(index, values))
