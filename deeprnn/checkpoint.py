"""Stage 9: one checkpoint dict (config, vocabulary, weights, training state), safe to load.

Saved with ``torch.save`` and loaded with ``torch.load(..., weights_only=True)``, which unpickles only
tensors and plain containers and so runs no code from the file. Writes are atomic.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from deeprnn.config import RunConfig
from deeprnn.model import RNNLM
from deeprnn.vocab import Vocab

FORMAT = "deeprnn-checkpoint/1"


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


def make_payload(
    config: RunConfig, vocab: Vocab, model: RNNLM, *, epoch: int, trainer_state: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint dict: JSON config, vocabulary, CPU weights, epochs done, optional resumable state."""
    return {
        "config": config.model_dump(mode="json"),
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
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError) as exc:
        # weights_only refuses pickled code (UnpicklingError); other errors mean it is no torch file at all.
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
