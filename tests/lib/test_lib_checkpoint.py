"""deeprnn.training.checkpoint: one dict (config, vocab, weights, trainer state), saved atomically, loaded
weights-only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from deeprnn.config import RunConfig, preset_config
from deeprnn.data.vocab import Vocab
from deeprnn.model import RNNLM
from deeprnn.training import checkpoint
from deeprnn.training.loop import Trainer

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
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.sha256"]  # its digest; no temporary file

    # A save that fails half-way keeps the previous checkpoint whole and leaves no temporary file.
    with pytest.raises((pickle.PicklingError, AttributeError)):  # how pickle refuses a lambda varies
        checkpoint.save(path, {"epoch": 2, "bad": lambda: None})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.sha256"]
    assert checkpoint.load(path)["epoch"] == 1


def _flip_exponent_bit(path: Path) -> None:
    """Flip the highest exponent bit of the first weight's first value, in place (a wrong value, not NaN)."""
    raw = bytearray(path.read_bytes())
    weights = next(iter(checkpoint.load(path)["model_state"].values())).flatten()
    value = weights[0].numpy().tobytes()
    at = raw.find(value + weights[1].numpy().tobytes())
    assert at > 0
    raw[at + 3] ^= 0x40  # little-endian float32: the top byte holds the sign and the upper exponent bits
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(
    trained, tiny_vocab: Vocab, tmp_path: Path, damage: str
) -> None:
    cfg, model, _ = trained
    path = checkpoint.save(tmp_path / "last.pt", checkpoint.make_payload(cfg, tiny_vocab, model, epoch=1))
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        _flip_exponent_bit(path)
    with pytest.raises(checkpoint.DamagedCheckpointError, match="is damaged") as info:
        checkpoint.load(path)
    assert str(path) in str(info.value) and "last.pt.sha256" in str(info.value)


def test_weights_that_are_not_finite_are_never_saved_nor_loaded(trained, tiny_vocab: Vocab, tmp_path: Path) -> None:
    cfg, model, _ = trained
    payload = checkpoint.make_payload(cfg, tiny_vocab, model, epoch=1)
    name = next(iter(payload["model_state"]))
    payload["model_state"][name][0] = float("nan")
    with pytest.raises(checkpoint.DamagedCheckpointError, match="not finite"):
        checkpoint.save(tmp_path / "last.pt", payload)
    assert not (tmp_path / "last.pt").exists()
    torch.save({"format": checkpoint.FORMAT, **payload}, tmp_path / "nan.pt")  # written by something else
    with pytest.raises(checkpoint.DamagedCheckpointError, match=f"not finite \\({name}"):
        checkpoint.load(tmp_path / "nan.pt")


def test_a_checkpoint_without_a_digest_file_still_loads(trained, tiny_vocab: Vocab, tmp_path: Path) -> None:
    """Checkpoints written before digests existed: loaded as they are, their weights still checked."""
    cfg, model, _ = trained
    path = checkpoint.save(tmp_path / "last.pt", checkpoint.make_payload(cfg, tiny_vocab, model, epoch=3))
    checkpoint.digest_path(path).unlink()
    assert checkpoint.load(path)["epoch"] == 3


def test_a_full_disk_is_one_clear_error_and_keeps_the_previous_checkpoint(
    trained, tiny_vocab: Vocab, small_filesystem: Path
) -> None:
    cfg, model, _ = trained
    path = checkpoint.save(small_filesystem / "last.pt", checkpoint.make_payload(cfg, tiny_vocab, model, epoch=1))
    stats = os.statvfs(small_filesystem)
    (small_filesystem / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 1024))
    with pytest.raises(checkpoint.CheckpointDiskFullError, match="no space left to write checkpoint") as info:
        checkpoint.save(path, checkpoint.make_payload(cfg, tiny_vocab, model, epoch=2))
    assert str(path) in str(info.value) and "bytes" in str(info.value)
    assert sorted(p.name for p in small_filesystem.iterdir()) == ["filler", "last.pt", "last.pt.sha256"]
    assert checkpoint.load(path)["epoch"] == 1
