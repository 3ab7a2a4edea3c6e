"""deeprnn.checkpoint: one dict (config, vocab, weights, trainer state), saved atomically, loaded weights-only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from deeprnn import checkpoint
from deeprnn.config import RunConfig, preset_config
from deeprnn.model import RNNLM
from deeprnn.train import Trainer
from deeprnn.vocab import Vocab

CPU = torch.device("cpu")
SIDE_EFFECTS: list[str] = []


def _record(text: str) -> None:
    SIDE_EFFECTS.append(text)


class Evil:
    """Unpickling this would call ``_record``: a stand-in for code execution from a checkpoint file."""

    def __reduce__(self):
        return (_record, ("code ran",))


@pytest.fixture()
def trained(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> tuple[RunConfig, RNNLM, Trainer]:
    cfg = preset_config("smoke", {"model": {"num_hiddens": 8, "cell": "gru"}, "train": {"epochs": 1, "device": "cpu"}})
    torch.manual_seed(0)
    model = RNNLM.from_config(len(tiny_vocab), cfg.model)
    trainer = Trainer(model, tiny_ids, cfg.train, CPU)
    trainer.fit()
    return cfg, model, trainer


def test_round_trip_restores_an_identical_model(trained, tiny_vocab: Vocab, tmp_path: Path) -> None:
    cfg, model, trainer = trained
    payload = checkpoint.make_payload(cfg, tiny_vocab, model, epoch=1, trainer_state=trainer.state_dict())
    path = checkpoint.save(tmp_path / "run" / "ckpt.pt", payload)
    assert path == tmp_path / "run" / "ckpt.pt" and path.is_file()

    data = checkpoint.load(path)  # weights_only=True inside
    assert data["format"] == checkpoint.FORMAT
    assert data["epoch"] == 1
    assert data["trainer_state"]["epoch"] == 1
    assert data["trainer_state"]["python_rng"] == payload["trainer_state"]["python_rng"]
    restored, vocab, config = checkpoint.restore_model(data)
    assert config == cfg
    assert vocab.idx_to_token == tiny_vocab.idx_to_token
    assert not restored.training
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name

    model.eval()
    x = torch.randint(0, len(vocab), (3, 9))
    a, ha = model(x, model.begin_state(3, CPU))
    b, hb = restored(x, restored.begin_state(3, CPU))
    assert torch.equal(a, b) and torch.equal(ha, hb)


def test_payload_holds_copies_of_the_weights(trained, tiny_vocab: Vocab) -> None:
    cfg, model, _ = trained
    payload = checkpoint.make_payload(cfg, tiny_vocab, model, epoch=1)
    before = payload["model_state"]["linear.bias"].clone()
    with torch.no_grad():
        model.linear.bias.add_(1.0)
    assert torch.equal(payload["model_state"]["linear.bias"], before)
    assert payload["trainer_state"] is None
    assert payload["config"]["model"]["cell"] == "gru"  # JSON config, not a pydantic object


def test_load_refuses_a_dict_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"model_state": {}}, path)
    with pytest.raises(ValueError, match="not a deeprnn checkpoint"):
        checkpoint.load(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a deeprnn checkpoint"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_load_runs_no_code_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": Evil()}, path)
    SIDE_EFFECTS.clear()
    with pytest.raises((pickle.UnpicklingError, ValueError)):  # torch's refusal, or a wrapped one
        checkpoint.load(path)
    assert SIDE_EFFECTS == []


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", b""])
def test_load_refuses_a_file_that_is_not_a_torch_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a deeprnn checkpoint") as info:
        checkpoint.load(path)
    assert str(path) in str(info.value)


def test_save_is_atomic(trained, tiny_vocab: Vocab, tmp_path: Path) -> None:
    cfg, model, _ = trained
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, checkpoint.make_payload(cfg, tiny_vocab, model, epoch=1))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind

    # A save that fails half-way keeps the previous checkpoint whole and leaves no temporary file.
    with pytest.raises((pickle.PicklingError, AttributeError)):  # how pickle refuses a lambda varies
        checkpoint.save(path, {"epoch": 2, "bad": lambda: None})
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert checkpoint.load(path)["epoch"] == 1
