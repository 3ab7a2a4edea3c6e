"""Small file helpers shared by the corpus cache, the token cache and the checkpoints: a file's SHA-1, a write
that readers see whole or not at all, and a byte count as people read it."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def sha1_of(path: Path) -> str:
    """The SHA-1 of a file's bytes, read in blocks (never the whole file in memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it into place: a reader sees
    the old file or the new one, never a part. On any error the temporary file is removed and the error raised
    (an ``OSError`` for a full disk or a read-only folder, for the caller to word)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def megabytes(num_bytes: int) -> str:
    """A size in a message: ``12.3 MB``, or ``45 kB`` under 0.1 MB."""
    return f"{num_bytes / 1e6:,.1f} MB" if num_bytes >= 100_000 else f"{num_bytes / 1e3:,.0f} kB"
