"""Every sweep is an Optuna study: the search space as Optuna distributions, the sampler and pruner of each
search, and the storage a study lives in.

A list of values becomes a categorical distribution, a ``{low, high, log}`` range a float (or, with integer bounds,
an int) distribution. Grid search enqueues the grid's points in order (``GridSampler``), random search its seeded
draws (``RandomSampler``); adaptive search (``optuna``) asks TPE, with a pruner. A study lives in an RDB URL
(``sqlite:///studies.db``, ``postgresql://...``) or a journal file (any other value), and running a sweep again
with the same study name continues it: a grid or random sweep runs the points it has not finished.

A crash while a journal record is written leaves the last line cut short: Optuna skips it, but glues its next
record onto it, and from then on cannot read the study, with an error that names no file. So ``check_journal``
refuses a record that is no JSON before the last line, and ``drop_torn_record`` cuts a torn last one off, under
Optuna's own lock, once a sweep has decided to run (Optuna never read it: the study is the same without it)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from deeprnn.config import section_values
from deeprnn.data.urls import hide_password, mask_password
from deeprnn.search.space import Range, SearchSpace, SearchSpaceError, Trial, expand, make_trial, parse_space
from deeprnn.search.study_orphans import GRACE_S, HEARTBEAT_S, Cleanup, fail_orphaned_trials

if TYPE_CHECKING:  # optuna loads only when a study is used
    import optuna
    from optuna.distributions import BaseDistribution

SAMPLERS = {"grid": "grid", "random": "random", "optuna": "tpe"}  # each search and its Optuna sampler
PRUNERS = ("asha", "median", "none")
DEFAULT_STORAGE = "optuna.journal"  # a journal file in the folder the sweep starts in
# Trials TPE draws at random before it models the space: a few, since a sweep here has tens of trials.
STARTUP_TRIALS = 4
_CATEGORY_TYPES = (str, int, float, bool, type(None))
DEFAULT_TRIALS = 10  # an adaptive sweep's trials per run, unless --max-trials says
SIGNATURE_ATTR = "deeprnn.search"  # the study's search, as ``StudySpec.signature`` writes it
_log = logging.getLogger(__name__)


class StudyError(ValueError):
    """The study cannot run as asked: unknown sampler or pruner, a space Optuna cannot hold, a storage that
    cannot be opened, or a study that holds another search. The message says which and why."""


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Each varied field of ``space`` as an Optuna distribution; ``StudyError`` for a space with nothing to
    vary, a range with nothing in it, or values Optuna cannot store."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not space.dims:
        raise StudyError(
            "nothing to search: give values to vary, e.g. --lr 0.5,1,2, --param train.seed=0,1 or --space FILE"
        )
    out: dict[str, BaseDistribution] = {}
    for key, dim in space.dims.items():
        if not isinstance(dim, Range):
            odd = [v for v in dim if not isinstance(v, _CATEGORY_TYPES)]
            if odd:
                raise StudyError(f"{key}: a choice holds numbers, words, true/false or null, not {odd[0]!r}")
            out[key] = CategoricalDistribution(dim)
        elif dim.low == dim.high:
            raise StudyError(f"{key}: the range {dim.low}..{dim.high} holds one value; give it as a value")
        elif dim.integer:
            out[key] = IntDistribution(int(dim.low), int(dim.high), log=dim.log)
        else:
            out[key] = FloatDistribution(dim.low, dim.high, log=dim.log)
    return out


def corner_values(space: SearchSpace) -> list[dict[str, Any]]:
    """Points that reach every end of the space: each value of each dimension (both ends of a range), the
    others at their first value. Validating them catches a space with configurations that cannot run."""
    ends = {k: d.ends if isinstance(d, Range) else d for k, d in space.dims.items()}
    first = {k: values[0] for k, values in ends.items()}
    return [{**first, key: value} for key, values in ends.items() for value in values]


def check_space(preset: str, overrides: Mapping[str, Any] | None, space: SearchSpace) -> None:
    """Refuse, before any trial, a space Optuna cannot hold or whose ends are not valid configurations."""
    distributions(space)
    for point in corner_values(space):
        try:
            make_trial(preset, overrides, space, 0, point)
        except SearchSpaceError as exc:
            raise StudyError(str(exc).replace("trial 0 ", "the search space's point ", 1)) from None


def make_sampler(search: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The sampler of ``search``, seeded. Grid and random trials take the points their sweep enqueued; TPE
    assumes the running trials' values are bad (``constant_liar``), so workers asking at the same time spread
    out instead of drawing the same point."""
    import optuna

    if search == "grid":
        return optuna.samplers.GridSampler({k: v for k, v in space.dims.items() if isinstance(v, list)}, seed=seed)
    if search == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS, constant_liar=True)


def make_pruner(name: str, max_steps: int | None = None) -> optuna.pruners.BasePruner:
    """``asha``: asynchronous successive halving, a third of the trials kept at each rung (with a step budget at
    1/27, 1/9 and 1/3 of ``max_steps``, else as Optuna estimates from the first finished trial); ``median``:
    below the median of earlier trials at the same step; ``none``: every trial runs to its end."""
    import optuna

    if name == "asha":
        first_rung: int | str = max(1, max_steps // 27) if max_steps else "auto"
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=3)
    if name == "median":
        # Not before two trials have finished: one curve is no median.
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, interval_steps=1)
    return optuna.pruners.NopPruner()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage at ``url``: an RDB URL (``dialect://...``, with Optuna's heartbeat on its trials) or a journal
    file path (its records checked first, ``check_journal``). ``StudyError`` saying why when it cannot be opened
    (server down, no such folder, no driver, a damaged journal)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    # sqlite: workers wait for the file's lock; a server's idle connections may close between two trials.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        if "://" not in url:
            return JournalStorage(JournalFileBackend(str(check_journal(url))))
        with warnings.catch_warnings(action="ignore"):  # Optuna marks the heartbeat "experimental"
            return optuna.storages.RDBStorage(
                driver_url(url), engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
    except StudyError:
        raise
    except Exception as exc:  # SQLAlchemy and drivers raise their own kinds; all mean "cannot open"
        lines = hide_password(str(exc), url).strip().splitlines()  # a driver may quote the URL it was given
        raise StudyError(
            f"cannot open the study storage {mask_password(url)}: {type(exc).__name__}: {lines[0] if lines else ''}"
        ) from None


def check_journal(url: str) -> Path:
    """The journal file at ``url``, its records read; ``StudyError`` naming the file, the first damaged line and
    what to do when a complete line is not a JSON record (or naming the folder when it does not exist)."""
    path = Path(url).expanduser()
    if not path.parent.is_dir():
        raise StudyError(f"cannot open the study storage {url}: folder {path.parent} does not exist")
    if not path.exists():
        return path
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # what follows the last newline: nothing, unless the last record is cut short
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or bytes that are no UTF-8
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            keep = f"head -n {number - 1} {path} > KEPT.journal" if number > 1 else "nothing before it to keep"
            raise StudyError(
                f"the study journal {path} is damaged: line {number} of {len(lines) + bool(tail)} is no record "
                f"({why}), so Optuna cannot read the study. Restore the file from a backup, or keep the "
                f"{number - 1} records before it ({keep}) and give --storage that file"
            ) from None
    return path


def drop_torn_record(path: Path, warn: Callable[[str], None]) -> None:
    """Cut a torn last record (a line without its newline) off the journal at ``path``, holding Optuna's lock
    on the file, and say so to ``warn``."""
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.exists():
        return
    lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's JournalFileBackend writes under
    lock.acquire()
    try:
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1  # 0 when no record is complete
        if keep < len(data):
            with open(path, "r+b") as f:  # synced: a record Optuna appends next never follows the torn one
                f.truncate(keep)
                os.fsync(f.fileno())
            warn(
                f"the study journal {path} ended in a record cut short ({len(data) - keep} bytes, a crash while it "
                "was written): dropped it; Optuna had never read it, so the study is unchanged"
            )
    finally:
        lock.release()


def driver_url(url: str) -> str:
    """``url`` with the driver SQLAlchemy should use: ``postgresql://`` and ``postgres://`` name psycopg 3
    (``postgresql+psycopg://``; SQLAlchemy's default would be psycopg2); any other URL, an explicit
    ``postgresql+driver://`` included, as given."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgresql", "postgres") else url


def is_local_storage(url: str) -> bool:
    """True for a storage only this machine reaches: a journal file or an sqlite database."""
    return "://" not in url or url.startswith("sqlite")


@dataclass(frozen=True)
class StudySpec:
    """What a study is: its name, where it lives, the search and its settings; what every worker opens."""

    name: str
    storage: str = field(repr=False)  # may hold a password: show ``shown_storage``
    space: dict[str, Any]  # as the sweep was given it (``parse_space`` reads it)
    preset: str
    overrides: dict[str, dict[str, Any]]  # the sections' fields every trial starts from
    search: str = "optuna"  # grid, random or optuna (adaptive)
    pruner: str = "asha"  # grid and random sweeps run every trial to its end: "none"
    seed: int = 0
    max_trials: int | None = None  # grid: the most points; random: the draws; optuna: trials each run adds

    @property
    def sampler(self) -> str:
        """The Optuna sampler of this search: grid, random or tpe."""
        return SAMPLERS[self.search]

    @property
    def shown_storage(self) -> str:
        """The storage as it may be printed, logged or kept as a parameter: its password masked."""
        return mask_password(self.storage)

    def signature(self) -> str:
        """The search as JSON, its varied fields' distributions and every other field's value, however they were
        given (options, sections or fixed values of the space): a study continues only with the same one."""
        space = parse_space(self.space)
        fixed = {k: v for k, v in self.first_point().config.flat().items() if k not in space.dims}
        # An adaptive study's signature is as it always was; a random sweep's points are its seed's draws.
        kind: dict[str, Any] = {} if self.search == "optuna" else {"kind": self.search}
        kind.update({"seed": self.seed} if self.search == "random" else {})
        return json.dumps({"search": space.describe(), "fixed": fixed, **kind}, sort_keys=True, default=str)

    def points(self) -> list[dict[str, Any]]:
        """A grid or random sweep's points, in order (``SearchSpaceError`` for a grid larger than
        ``max_trials`` or with ranges); an adaptive sweep has none: its sampler draws them."""
        if self.search == "optuna":
            return []
        return expand(parse_space(self.space), self.search == "random", self.max_trials, self.seed)

    def first_point(self) -> Trial:
        """The space's first corner as a trial: the configuration every field not searched has."""
        space = parse_space(self.space)
        return make_trial(self.preset, self.overrides, space, 0, corner_values(space)[0])

    def load(
        self, seed_offset: int = 0, max_steps: int | None = None, storage: optuna.storages.BaseStorage | None = None
    ) -> optuna.Study:
        """The study, with its sampler seeded at ``seed + seed_offset`` (each trial's own offset: workers do not
        share a random generator) and its pruner for trials of ``max_steps`` steps, from ``storage`` when it is
        open already."""
        import optuna

        return optuna.load_study(
            study_name=self.name,
            storage=storage or open_storage(self.storage),
            sampler=make_sampler(self.search, self.seed + seed_offset, parse_space(self.space)),
            pruner=make_pruner(self.pruner, max_steps),
        )


def study_spec(
    space: dict[str, Any],
    preset: str,
    sections: Mapping[str, Any],
    search: str = "optuna",
    max_trials: int | None = None,
    study: str | None = None,
    storage: str = DEFAULT_STORAGE,
    pruner: str = "asha",
    seed: int = 0,
    experiment: str = "deeprnn-sweep",
) -> StudySpec:
    """The study to run, every input checked (names, space, its ends as configurations, and every point of a
    grid or random sweep), nothing opened yet. ``study``: its name; by default ``EXPERIMENT-SEARCH-DIGEST``, the
    digest of the search (``StudySpec.signature``): the same sweep again continues its study, another starts its
    own."""
    for kind, value, known in (("search", search, SAMPLERS), ("pruner", pruner, PRUNERS)):
        if value not in known:
            raise StudyError(f"unknown {kind} {value!r}; choose one of: {', '.join(known)}")
    overrides = {k: section_values(v) for k, v in sections.items() if section_values(v)}
    search_space = parse_space(space)
    check_space(preset, overrides, search_space)
    pruner = pruner if search == "optuna" else "none"  # grid and random trials run to their end
    spec = StudySpec(study or "", storage, space, preset, overrides, search, pruner, seed, max_trials)
    if not study:
        digest = hashlib.sha1(spec.signature().encode()).hexdigest()[:8]
        spec = dataclasses.replace(spec, name=f"{experiment}-{search}-{digest}")
    for index, point in enumerate(spec.points()):  # a grid or random sweep: each of its trials is valid
        make_trial(preset, overrides, search_space, index, point)
    return spec


def check_storage(spec: StudySpec) -> int | None:
    """Decide, writing nothing, whether ``spec`` can run: the storage opens (a journal's records are checked),
    a study of that name, if any, ran the same search, and a grid or random sweep has points left to run.
    Returns how many trials the study holds (``None``: no such study yet); ``StudyError`` saying why not."""
    trials = _existing(spec)[1]
    if trials and spec.points():
        _missing(spec, trials)
    return None if trials is None else len(trials)


def _missing(spec: StudySpec, trials: list[Any]) -> list[dict[str, Any]]:
    """The points of a grid or random sweep that no trial finished (COMPLETE): those it still runs.
    ``StudyError`` when there are none."""
    done = [t.params for t in trials if t.state.name == "COMPLETE"]
    missing = [p for p in spec.points() if p not in done]
    if not missing:
        raise StudyError(
            f"study {spec.name!r} in {spec.shown_storage} has finished every point of this {spec.search} search: "
            "nothing is left to run; give another --study name to run it again"
        )
    return missing


def enqueue_points(study: optuna.Study, spec: StudySpec) -> int:
    """Enqueue each point of a grid or random sweep that the study has neither finished nor holds waiting (an
    earlier run of the sweep may have been stopped); returns how many trials this run is to take, ``max_trials``
    (10 by default) for an adaptive sweep."""
    if spec.search == "optuna":
        return spec.max_trials or DEFAULT_TRIALS
    trials = study.get_trials(deepcopy=False)
    waiting = [t.system_attrs.get("fixed_params") for t in trials if t.state.name == "WAITING"]
    missing = _missing(spec, trials)
    for point in missing:
        if point in waiting:
            waiting.remove(point)
        else:
            study.enqueue_trial(point)
    return len(missing)


def _existing(spec: StudySpec) -> tuple[optuna.storages.BaseStorage | None, list[Any] | None]:
    """The storage opened (``None`` for a journal file not there yet: opening would create it) and the trials
    of the study named ``spec.name`` (``None``: none of that name), its search checked."""
    if "://" not in spec.storage and not check_journal(spec.storage).exists():
        return None, None
    storage = open_storage(spec.storage)
    try:
        study_id = storage.get_study_id_from_name(spec.name)
    except KeyError:
        return storage, None
    _check_search(spec, storage.get_study_user_attrs(study_id))
    return storage, storage.get_all_trials(study_id, deepcopy=False)


def _check_search(spec: StudySpec, attrs: Mapping[str, Any]) -> None:
    known = attrs.get(SIGNATURE_ATTR)
    if known is not None and known != spec.signature():
        raise StudyError(
            f"study {spec.name!r} in {spec.shown_storage} holds trials of another search (space, preset or fixed "
            "fields differ): give the same search to continue it, or another --study name"
        )


def start_study(spec: StudySpec, warn: Callable[[str], None] = _log.warning) -> tuple[optuna.Study, Cleanup]:
    """Create the study, or continue the one of that name when it ran the same search (``StudyError`` when it
    ran another: another space, preset or fixed fields), then mark ``FAIL`` the trials earlier sweeps left
    ``RUNNING`` whose process is gone (``deeprnn.search.study_orphans``). Everything is checked before the first
    write; a journal's torn last record is then dropped, with a warning to ``warn``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines repeat what the sweep logs
    storage, trials = _existing(spec)  # every check before the first write
    if "://" not in spec.storage:
        drop_torn_record(Path(spec.storage).expanduser(), warn)
    storage = storage or open_storage(spec.storage)
    if trials is None:  # loading writes nothing (creating again would append a record to a journal)
        made = optuna.create_study(study_name=spec.name, storage=storage, direction="minimize", load_if_exists=True)
        _check_search(spec, made.user_attrs)  # another sweep may have created it with another search meanwhile
        made.set_user_attr(SIGNATURE_ATTR, spec.signature())
    study = spec.load(storage=storage)
    return study, fail_orphaned_trials(study, storage)
