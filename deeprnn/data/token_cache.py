"""The token cache's entries on disk: sealed when built, verified on every read, and the leftovers of builds
that died removed.

An entry is a folder of three files, ``ids.bin``, ``vocab.json`` and ``meta.json``. ``meta.json`` holds the
SHA-1 of the other two and a SHA-1 of its own content (``meta_sha1``, over its canonical JSON without that
field), so one flipped bit anywhere is found before anything is served. Anything else where an entry should
be (a file, a symbolic link, a folder missing a file) is removed and built again.

A build writes into ``.build-<key>-<random>`` beside the entries, with ``builder.json`` (the builder's pid,
host and start time) in it, and renames it into place when complete. A build stopped by a signal or a crash
leaves that folder behind; the next ``prepare`` removes it when its builder is gone: the folder belongs to
the entry whose lock this call holds (so it is older than the lock's holder), its builder's process is dead
on this host, or its entry's lock is free. A folder without ``builder.json`` and a key (made by an older
version) is removed once it is a day old.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deeprnn.data.file_io import sha1_of

log = logging.getLogger(__name__)

FORMAT = "deeprnn-tokens/2"
BUILDER = "builder.json"
LEGACY_BUILD_AGE = 24 * 3600  # seconds after which a build folder nobody claims is surely dead
_BUILD = re.compile(r"\.build-(?P<key>[0-9a-f]{32})-")


@dataclass(frozen=True)
class SpaceEstimate:
    """About how much disk an entry's build takes: ``entry`` bytes kept, ``peak`` bytes held at once while
    building (the entry and, for the book's rule, the normalized text spilled on the way, one byte a token)."""

    entry: int
    peak: int


class DamagedEntryError(ValueError):
    """An entry's files do not match what its ``meta.json`` says."""


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha1"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def read_entry(folder: Path) -> dict[str, Any] | None:
    """The verified ``meta.json`` of the entry in ``folder``; None when there is none. An entry that fails a
    check is removed (one warning saying why) and None returned, so that it is built again."""
    if not os.path.lexists(folder):
        return None
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise DamagedEntryError("a file or a symbolic link, not a folder")
        for name in ("ids.bin", "vocab.json", "meta.json"):
            if not stat.S_ISREG(os.lstat(folder / name).st_mode):
                raise DamagedEntryError(f"{name} is not a plain file")
        meta: dict[str, Any] = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        found = meta.get("format")  # AttributeError when meta.json holds no object
        if found != FORMAT:
            raise DamagedEntryError(f"format {found!r}, not {FORMAT}: an older version wrote it, or not deeprnn")
        if meta.get("meta_sha1") != _meta_digest(meta):
            raise DamagedEntryError("meta.json does not match its own SHA-1")
        for name, key in (("vocab.json", "vocab_sha1"), ("ids.bin", "ids_sha1")):
            if sha1_of(folder / name) != meta[key]:
                raise DamagedEntryError(f"{name} does not match the SHA-1 in meta.json")
        return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("token cache entry %s is damaged (%s): preparing it again", folder, exc)
        remove(folder)
        return None


def remove(path: Path) -> None:
    """Remove whatever is at ``path``: a folder with everything in it, a file, or a link (not its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def new_build_folder(root: Path, key: str) -> Path:
    """A fresh build folder for entry ``key`` in ``root``, with ``builder.json`` saying who builds it."""
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".build-{key}-"))
    builder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    (tmp / BUILDER).write_text(json.dumps(builder), encoding="utf-8")
    return tmp


def publish(tmp: Path, folder: Path, meta: dict[str, Any]) -> None:
    """Seal a complete build folder (``meta.json`` with the SHA-1 of its vocabulary and of itself), then rename it
    into place (atomic: readers see the whole entry or none)."""
    sealed = {**meta, "format": FORMAT, "vocab_sha1": sha1_of(tmp / "vocab.json")}
    sealed["meta_sha1"] = _meta_digest(sealed)
    (tmp / "meta.json").write_text(json.dumps(sealed, indent=1, ensure_ascii=False), encoding="utf-8")
    (tmp / BUILDER).unlink()
    os.replace(tmp, folder)


def remove_dead_builds(root: Path, held_key: str) -> None:
    """Remove the build folders in ``root`` whose builder is gone (the caller holds the lock of ``held_key``)."""
    for path in root.glob(".build-*"):
        why = _dead_because(path, held_key)
        if why:
            log.info("removing %s, left by a build that stopped (%s)", path, why)
            remove(path)


def _dead_because(path: Path, held_key: str) -> str | None:
    """Why the build in ``path`` is dead, or None while it may still be running."""
    named = _BUILD.match(path.name)
    key = named["key"] if named else None
    if key == held_key:
        return "its entry's lock is ours now"
    gone = _ended_process(path)
    if gone is not None:
        return f"its process {gone} is gone"
    if key is not None:
        return "nobody holds its entry's lock" if _lock_is_free(path.parent / f"{key}.lock") else None
    try:
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return None
    return "untouched for a day, by an older version" if age > LEGACY_BUILD_AGE else None


def _ended_process(path: Path) -> Any:
    """The pid that ``builder.json`` in ``path`` names when it is a process of this host that has ended, else
    None: no record, another host's process, or one that runs (or that this user may not ask about)."""
    try:
        builder = json.loads((path / BUILDER).read_text(encoding="utf-8"))
        if builder["host"] == socket.gethostname():
            os.kill(builder["pid"], 0)
    except ProcessLookupError:
        return builder["pid"]
    except (OSError, ValueError, KeyError, TypeError, OverflowError):
        pass  # PermissionError among them: someone else's process, which runs
    return None


def _lock_is_free(lock: Path) -> bool:
    from filelock import FileLock, Timeout

    if not lock.exists():
        return True
    try:
        with FileLock(str(lock), timeout=0):
            return True
    except Timeout:
        return False
