"""Stage 9: one checkpoint dict (config, vocabulary, weights, training state), safe to load.

Saved with ``torch.save`` and loaded with ``torch.load(..., weights_only=True)``, which unpickles only
tensors and plain containers and so runs no code from the file. Writes are atomic.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from deeprnn.config import RunConfig
from deeprnn.model import RNNLM
from deeprnn.vocab import Vocab

FORMAT = "deeprnn-checkpoint/1"


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
    """The file holds pickled objects that ``weights_only`` loading refuses (they could run code)."""


def save(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) to ``path`` atomically; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ckpt-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def config_dict(config: RunConfig) -> dict[str, Any]:
    """The configuration as JSON-ready data, with any credentials removed from the corpus URL.

    This is what checkpoints and the logged ``config.json`` keep: files that travel (MLflow artifacts,
    registered models) must not carry a password. A resumed run takes the URL again from its user.
    """
    return config.model_dump(mode="json")  # the URL's credentials stay out (DataConfig's JSON form)


def make_payload(
    config: RunConfig, vocab: Vocab, model: RNNLM, *, epoch: int, trainer_state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint dict: JSON config (no credentials), vocabulary, CPU weights, epochs done, optional
    resumable state."""
    return {
        "config": config_dict(config),
        "vocab": vocab.to_dict(),
        "model_state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "epoch": epoch,
        "trainer_state": trainer_state,
    }


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without running pickled code; refuse files that are not deeprnn checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():  # a damaged or foreign pickle, not a refused object
            raise ValueError(f"{path} is not a deeprnn checkpoint that loads safely: {exc}") from None
        # torch's text suggests weights_only=False; keep only the line naming the refused object.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path} is not a deeprnn checkpoint that loads safely: it holds a pickled object{what} that could "
            "run code when loaded, so it is refused. Use only checkpoints that deeprnn wrote"
        ) from None
    except (EOFError, KeyError, RuntimeError, ValueError) as exc:
        # Anything else torch trips over means it is no torch file at all.
        raise ValueError(f"{path} is not a deeprnn checkpoint that loads safely: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a deeprnn checkpoint (format {FORMAT})")
    return data


def restore_model(data: dict[str, Any], device: str | torch.device = "cpu") -> tuple[RNNLM, Vocab, RunConfig]:
    """The model (weights loaded, eval mode), vocabulary and config stored in a checkpoint dict."""
    config = RunConfig.model_validate(data["config"])
    vocab = Vocab.from_dict(data["vocab"])
    model = RNNLM.from_config(len(vocab), config.model)
    model.load_state_dict(data["model_state"])
    return model.to(device).eval(), vocab, config
