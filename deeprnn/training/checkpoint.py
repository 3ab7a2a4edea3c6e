"""Stage 9: one checkpoint dict (config, vocabulary, weights, training state), safe to load.

Saved with ``torch.save`` and loaded with ``torch.load(..., weights_only=True)``, which unpickles only
tensors and plain containers and so runs no code from the file. Writes are atomic.

Every checkpoint has its SHA-256 beside it (``last.pt.sha256``: the hex digest and the file's name, as
``sha256sum`` writes it), checked before the file is loaded: a truncated file or one flipped bit is refused
as damaged, naming the file, instead of loading (or resuming from) wrong weights. Weights that are not finite
are refused on save and on load. A checkpoint without a digest file (written before digests existed) still
loads, its weights still checked.
"""

from __future__ import annotations

import errno
import hashlib
import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from deeprnn.config import RunConfig
from deeprnn.data.file_io import write_atomic
from deeprnn.data.vocab import Vocab
from deeprnn.model import RNNLM

FORMAT = "deeprnn-checkpoint/1"


DIGEST_SUFFIX = ".sha256"


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file holds pickled objects that ``weights_only`` loading refuses (they could run code)."""


class CheckpointDiskFullError(OSError):
    """The disk of the run folder has no room for the checkpoint; the previous one is kept whole."""


class DamagedCheckpointError(ValueError):
    """The file is not the checkpoint that was written: its digest differs, it is cut short, or its weights
    are not finite."""


def digest_path(path: Path) -> Path:
    """The file holding ``path``'s SHA-256: ``<name>.sha256`` beside it."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) to ``path`` atomically, with its SHA-256 beside it; returns
    ``path``. Refuses (``DamagedCheckpointError``) weights that are not finite; a full disk raises
    ``CheckpointDiskFullError`` and keeps the previous checkpoint whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_finite(path, payload.get("model_state") or {})
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    data = buffer.getvalue()
    digest = f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode()
    # Stopped between the two writes, the file and its digest disagree: it reads as damaged, never as good.
    for target, content in ((path, data), (digest_path(path), digest)):
        try:
            write_atomic(target, content)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk (or quota) gets one clear message
                raise
            raise CheckpointDiskFullError(
                exc.errno,
                f"no space left to write checkpoint {target} ({len(content):,} bytes): free space on that disk, "
                "or give --runs-dir a folder on another one; the previous checkpoint there is kept whole",
            ) from None
    return path


def verify(path: Path) -> bytes:
    """The bytes of checkpoint ``path`` once they match the SHA-256 written beside it (no digest file: as
    they are); ``DamagedCheckpointError`` naming the file when they do not."""
    path = Path(path)
    data = path.read_bytes()
    sidecar = digest_path(path)
    if sidecar.is_file():
        expected = sidecar.read_text(encoding="utf-8", errors="replace").split(maxsplit=1)[:1]
        if expected != [hashlib.sha256(data).hexdigest()]:
            raise DamagedCheckpointError(
                f"checkpoint {path} is damaged: its SHA-256 is not the one in {sidecar.name} "
                f"({len(data):,} bytes; cut short or changed on disk)"
            )
    return data


def _check_finite(path: Path, state: dict[str, Any]) -> None:
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise DamagedCheckpointError(f"checkpoint {path} holds weights that are not finite ({', '.join(bad[:3])})")


def make_payload(
    config: RunConfig, vocab: Vocab, model: RNNLM, *, epoch: int, trainer_state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint dict: JSON config (no credentials), vocabulary, CPU weights, epochs done, optional
    resumable state."""
    # The URL's credentials stay out (DataConfig's JSON form): files that travel (MLflow artifacts, registered
    # models) must not carry a password. A resumed run takes the URL again from its user.
    return {
        "config": config.model_dump(mode="json"),
        "vocab": vocab.to_dict(),
        "model_state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "epoch": epoch,
        "trainer_state": trainer_state,
    }


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without running pickled code, once its digest matches; refuse files that are not
    deeprnn checkpoints, damaged ones (``DamagedCheckpointError``) and weights that are not finite."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = verify(path)
    try:
        data = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, KeyError, OSError, RuntimeError, ValueError) as exc:
        if not isinstance(exc, pickle.UnpicklingError) or "weights only" not in str(exc).lower():
            # Not a refused object: no torch file at all, one cut short, or a damaged or foreign pickle.
            raise ValueError(f"{path} is not a deeprnn checkpoint that loads safely: {exc}") from None
        # torch's text suggests weights_only=False; keep only the line naming the refused object.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} is not a deeprnn checkpoint that loads safely: it holds a pickled object{what} that could "
            "run code when loaded, so it is refused. Use only checkpoints that deeprnn wrote"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deeprnn checkpoint (format {FORMAT})")
    _check_finite(path, data.get("model_state") or {})
    return data


def restore_model(data: dict[str, Any], device: str | torch.device = "cpu") -> tuple[RNNLM, Vocab, RunConfig]:
    """The model (weights loaded, eval mode), vocabulary and config stored in a checkpoint dict."""
    config = RunConfig.model_validate(data["config"])
    vocab = Vocab.from_dict(data["vocab"])
    model = RNNLM.from_config(len(vocab), config.model)
    model.load_state_dict(data["model_state"])
    return model.to(device).eval(), vocab, config


def rng_from_lists(state: Any) -> tuple[Any, ...]:
    """A saved ``random.Random`` state as ``setstate`` takes it: checkpoints keep it as ``getstate`` gives it,
    those written before as plain lists."""
    return state[0], tuple(state[1]), state[2]
