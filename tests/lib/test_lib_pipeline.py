"""deeprnn.pipeline's training stage: the run folder's last.pt and model.pt, the hooks around each checkpoint,
and a second start in the same folder (a retry, a resumed run) continuing from last.pt."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deeprnn.config import RunConfig, preset_config
from deeprnn.data.batching import Splits
from deeprnn.data.vocab import Vocab
from deeprnn.pipeline import TrainingHooks, start_training
from deeprnn.training import checkpoint, stop_signals
from deeprnn.training.progress import StepStats
from deeprnn.training.resume import LAST, MODEL

URL = "http://127.0.0.1:8000/timemachine.txt"


def _config(**train: object) -> RunConfig:
    return preset_config("smoke", {"data": {"url": URL}, "train": {"device": "cpu", "checkpoint_every": 1, **train}})


def _splits(ids: torch.Tensor) -> Splits:
    return Splits(train=ids[:-400], val=ids[-400:-200], test=ids[-200:])


def test_training_stage_checkpoints_inside_the_guard_and_saves_the_selected_weights(
    tmp_path: Path, tiny_vocab: Vocab, tiny_ids: torch.Tensor
) -> None:
    events: list[str] = []

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        events.append("enter")
        yield
        events.append("exit")

    hooks = TrainingHooks(
        on_epoch=lambda s: events.append(f"epoch {s.epoch}"),
        before_checkpoint=lambda: events.append("before"),
        after_checkpoint=lambda path: events.append(f"after {path.name} {path.is_file()}"),
        guard=guard,
    )
    splits = _splits(tiny_ids)
    run = start_training(_config(epochs=3), tiny_vocab, splits, tmp_path)
    assert not run.resumed and run.epochs_done == 0
    assert run.describe().endswith(f"3 epochs of {splits.train.numel()} tokens, held-out = validation split")
    outcome = run.fit(hooks)

    assert outcome.epochs_done == 3 and [h.epoch for h in outcome.history] == [1, 2, 3]
    assert outcome.steps_done == run.trainer.step > 0 and outcome.device == "cpu"
    # Each epoch, then its checkpoint: the hook before it, the file, the hook after it, all inside the guard.
    each = ["enter", "epoch {}", "exit", "enter", "before", "after last.pt True", "exit"]
    assert events == [e.format(n) for n in (1, 2, 3) for e in each]
    last, final = checkpoint.load(tmp_path / LAST), checkpoint.load(tmp_path / MODEL)
    assert last["epoch"] == 3 and last["trainer_state"]["step"] == outcome.steps_done
    assert outcome.checkpoint == str(tmp_path / MODEL) and final["trainer_state"] is None
    # With a validation split the best epoch's weights are the ones saved.
    best = outcome.best_epoch
    assert best is not None and outcome.best_heldout_perplexity == min(
        h.heldout_perplexity for h in outcome.history if h.heldout_perplexity is not None
    )
    for key, value in run.trainer.model.state_dict().items():
        assert torch.equal(final["model_state"][key], value)


def test_a_second_start_in_the_folder_continues_from_last_pt_like_one_run(
    tmp_path: Path, tiny_vocab: Vocab, tiny_ids: torch.Tensor
) -> None:
    splits = _splits(tiny_ids)
    straight = start_training(_config(epochs=4), tiny_vocab, splits, tmp_path / "straight").fit(TrainingHooks())

    folder = tmp_path / "resumed"
    first = start_training(_config(epochs=2), tiny_vocab, splits, folder).fit(TrainingHooks())
    again = start_training(_config(epochs=4), tiny_vocab, splits, folder)  # epochs may be raised on resume
    assert again.resumed and again.epochs_done == 2 and again.trainer.step == first.steps_done
    outcome = again.fit(TrainingHooks(), earlier=first.history)

    assert [h.epoch for h in outcome.history] == [1, 2, 3, 4]
    assert [h.train_perplexity for h in outcome.history] == [h.train_perplexity for h in straight.history]
    assert outcome.final_train_perplexity == straight.final_train_perplexity
    assert outcome.steps_done == straight.steps_done


@pytest.fixture
def stop_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The command's stop handler installed in this process, with a state of its own, removed afterwards."""
    monkeypatch.setattr(stop_signals, "_STATE", stop_signals._State())
    monkeypatch.setattr(stop_signals, "STOP_SECONDS", 3600.0)  # no forced exit of the test process
    previous = {signum: signal.getsignal(signum) for signum in stop_signals.STOP_SIGNALS}
    stop_signals.handle_stop_signals()
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_sigterm_in_training_checkpoints_the_step_boundary_and_resumes_like_one_run(
    tmp_path: Path, tiny_vocab: Vocab, tiny_ids: torch.Tensor, stop_handler: None
) -> None:
    splits = _splits(tiny_ids)
    config = _config(epochs=4, checkpoint_every=None)  # no checkpoint but the one the stop writes
    straight = start_training(config, tiny_vocab, splits, tmp_path / "straight")
    straight_outcome = straight.fit(TrainingHooks())

    def signal_after_epoch_2(stats: StepStats) -> None:
        if stats.epoch == 2 and stats.epoch_end:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled in this (the main) thread

    folder = tmp_path / "stopped"
    run = start_training(config, tiny_vocab, splits, folder)
    hooks = TrainingHooks(on_step=signal_after_epoch_2, stop_requested=stop_signals.requested)
    with pytest.raises(stop_signals.StopRequested) as info, stop_signals.held():
        run.fit(hooks)
    assert info.value.exit_code == 143 and info.value.signal_name == "SIGTERM"
    saved = checkpoint.load(folder / LAST)
    assert saved["epoch"] == 2 and saved["trainer_state"]["step"] == run.trainer.step
    assert not (folder / MODEL).exists()  # stopped: no final model

    again = start_training(config, tiny_vocab, splits, folder)
    outcome = again.fit(TrainingHooks())
    assert again.epochs_done == 2 and outcome.steps_done == straight_outcome.steps_done
    for key, value in straight.trainer.model.state_dict().items():
        assert torch.equal(again.trainer.model.state_dict()[key], value), key


def test_a_stop_signal_is_held_back_until_the_block_ends(stop_handler: None) -> None:
    done = []
    with pytest.raises(stop_signals.StopRequested) as info:
        with stop_signals.held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append(stop_signals.requested())  # the block runs on to its end
    assert done == [signal.SIGINT] and info.value.exit_code == 130
