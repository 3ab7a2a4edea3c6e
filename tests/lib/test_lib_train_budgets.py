"""Budgets for large corpora: a step budget, evaluation and checkpoints every N steps, a held-out cap,
progress inside an epoch, and token ids of small dtypes (also memory-mapped)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deeprnn.config import RunConfig, preset_config
from deeprnn.data.batching import split_corpus
from deeprnn.data.vocab import Vocab
from deeprnn.durations import format_duration, parse_duration
from deeprnn.evaluate import perplexity
from deeprnn.model import RNNLM
from deeprnn.training import loop as train_module
from deeprnn.training.loop import Trainer
from deeprnn.training.progress import EpochStats, StepStats, eta_seconds, progress_line

CPU = torch.device("cpu")


def _cfg(**train: Any) -> RunConfig:
    model = train.pop("model", {})
    base = {"epochs": 3, "device": "cpu", "eval_every": 1000, "log_every": 1}
    return preset_config("smoke", {"model": {"num_hiddens": 16, **model}, "train": {**base, **train}})


def _trainer(vocab: Vocab, ids: torch.Tensor, cfg: RunConfig, **kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    return Trainer(RNNLM.from_config(len(vocab), cfg.model), ids, cfg.train, CPU, **kwargs)


def _count_training_forwards(model: torch.nn.Module) -> list[int]:
    """Counts forward passes in training mode (one per optimizer step; evaluation runs in eval mode)."""
    calls = [0]

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        if module.training:
            calls[0] += 1

    model.register_forward_hook(hook)
    return calls


def _steps_per_epoch(vocab: Vocab, ids: torch.Tensor, epochs: int) -> list[int]:
    trainer = _trainer(vocab, ids, _cfg(epochs=epochs))
    return [h.step for h in trainer.fit().history]


def test_max_steps_stops_inside_an_epoch(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    ends = _steps_per_epoch(tiny_vocab, tiny_ids, 3)  # global step at the end of each epoch
    budget = ends[0] + 3  # three steps into epoch 2
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=3, max_steps=budget))
    forwards = _count_training_forwards(trainer.model)
    checkpoints: list[tuple[int, int]] = []
    result = trainer.fit(on_checkpoint=lambda e: checkpoints.append((e, trainer.step)))
    assert forwards[0] == budget == result.steps_done == trainer.step
    assert result.epochs_done == 1 == trainer.epoch  # epoch 2 was not finished
    assert [(h.epoch, h.partial, h.step) for h in result.history] == [(1, False, ends[0]), (2, True, budget)]
    assert result.history[1].tokens_per_sec > 0 and math.isfinite(result.history[1].train_perplexity)
    assert checkpoints == [(1, budget)]  # the final checkpoint is taken where the budget ended
    assert trainer.state_dict()["position"]["batch"] == 3  # ... and knows where inside epoch 2 that is


def test_max_steps_at_an_epoch_end_leaves_no_partial_epoch(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    ends = _steps_per_epoch(tiny_vocab, tiny_ids, 2)
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=5, max_steps=ends[1]))
    result = trainer.fit()
    assert [(h.epoch, h.partial) for h in result.history] == [(1, False), (2, False)]
    assert result.epochs_done == 2 and result.steps_done == ends[1]
    assert trainer.state_dict()["position"] is None
    assert trainer.fit().history == []  # the budget is spent: nothing more to do


def test_evaluations_and_checkpoints_every_n_steps(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    heldout = tiny_ids[-300:]
    cfg = _cfg(epochs=2, eval_every_steps=4, checkpoint_every_steps=6)
    trainer = _trainer(tiny_vocab, tiny_ids[:-300], cfg, heldout_ids=heldout)
    reports: list[StepStats] = []
    measured: dict[int, float] = {}

    def on_step(s: StepStats) -> None:
        reports.append(s)
        if s.heldout_perplexity is not None:  # the value is the model's perplexity right at that step
            measured[s.step] = perplexity(trainer.model, heldout, rows=8)

    checkpoints: list[int] = []
    result = trainer.fit(on_step=on_step, on_checkpoint=lambda e: checkpoints.append(trainer.step))
    total = result.steps_done
    held = {s.step: s.heldout_perplexity for s in reports if s.heldout_perplexity is not None}
    assert sorted(held) == sorted(set(range(4, total + 1, 4)) | {total})  # every 4 steps, and at the end
    assert held == pytest.approx(measured, rel=1e-6)
    assert checkpoints == sorted(set(range(6, total + 1, 6)) | {total})
    assert any(not s.epoch_end for s in reports if s.heldout_perplexity is not None)  # inside epochs too
    # The per-epoch evaluation keeps its own schedule (eval_every=1000: only the last epoch).
    assert [h.epoch for h in result.history if h.heldout_perplexity is not None] == [2]


def test_eval_max_tokens_reads_only_the_first_n_heldout_tokens(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    heldout = tiny_ids[-400:].clone()
    n = 150
    trainer = _trainer(tiny_vocab, tiny_ids[:-400], _cfg(epochs=1, eval_max_tokens=n), heldout_ids=heldout)
    result = trainer.fit()
    value = result.history[-1].heldout_perplexity
    assert result.eval_tokens == n  # stated in the results
    assert (
        _trainer(tiny_vocab, tiny_ids, _cfg(epochs=1), heldout_ids=heldout).fit().eval_tokens == 400
    )  # default cap: above
    assert value == pytest.approx(perplexity(trainer.model, heldout[:n], rows=8), rel=1e-12)
    assert value != pytest.approx(perplexity(trainer.model, heldout, rows=8), rel=1e-6)
    # Whatever follows the first n tokens is never read.
    heldout[n:] = (heldout[n:] + 1) % len(tiny_vocab)
    again, whole = trainer._heldout_perplexity()
    assert again == pytest.approx(value, rel=1e-12) and whole  # no deadline: every token it was meant to read


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
@pytest.mark.parametrize("partition", ["sequential", "random"])
def test_small_integer_ids_train_to_the_same_weights(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor, dtype: torch.dtype, partition: str
) -> None:
    cfg = _cfg(epochs=2, partition=partition, eval_every=1)
    wide = _trainer(tiny_vocab, tiny_ids[:-300], cfg, heldout_ids=tiny_ids[-300:])
    narrow = _trainer(tiny_vocab, tiny_ids[:-300].to(dtype), cfg, heldout_ids=tiny_ids[-300:].to(dtype))
    assert narrow.train_ids.dtype == dtype  # kept as it came: no int64 copy of the corpus
    a, b = wide.fit(), narrow.fit()
    assert [h.heldout_perplexity for h in a.history] == [h.heldout_perplexity for h in b.history]
    for name, value in wide.model.state_dict().items():
        assert torch.equal(narrow.model.state_dict()[name], value), name


def test_memory_mapped_uint8_ids(tiny_vocab: Vocab, tiny_ids: torch.Tensor, tmp_path: Path) -> None:
    # The shape of a token cache: a uint8 file on disk, read through numpy's memmap without loading it.
    path = tmp_path / "ids.u8"
    tiny_ids.numpy().astype(np.uint8).tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="r+"))
    cfg = _cfg(epochs=2, eval_every=1)
    from_file = _trainer(tiny_vocab, mapped[:-300], cfg, heldout_ids=mapped[-300:])
    in_memory = _trainer(tiny_vocab, tiny_ids[:-300], cfg, heldout_ids=tiny_ids[-300:])
    assert from_file.train_ids.data_ptr() == mapped.data_ptr()  # still the file's pages, not a copy
    a, b = from_file.fit(), in_memory.fit()
    assert [h.heldout_perplexity for h in a.history] == [h.heldout_perplexity for h in b.history]
    for name, value in in_memory.model.state_dict().items():
        assert torch.equal(from_file.model.state_dict()[name], value), name


def test_float_ids_are_refused(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="token ids must be integers, not torch.float32"):
        _trainer(tiny_vocab, tiny_ids.float(), _cfg())


def test_progress_is_reported_inside_an_epoch(
    tiny_vocab: Vocab, tiny_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "_SYNC_SECONDS", 0.0)  # every step is "a long time" since the last report
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=2))
    reports: list[StepStats] = []
    epochs: list[EpochStats] = []
    result = trainer.fit(on_step=reports.append, on_epoch=epochs.append)
    assert [s.step for s in reports] == list(range(1, result.steps_done + 1))  # one report per step here
    inside = [s for s in reports if not s.epoch_end]
    assert inside and all(0 < s.batch < s.batches and s.eta_seconds is not None for s in inside)
    assert [s.epoch for s in reports if s.epoch_end] == [1, 2]
    last = reports[-1]
    assert last.total_steps == last.step == result.steps_done and last.eta_seconds == 0.0
    assert reports[0].total_steps == 2 * reports[0].batches  # planned from the first epoch's size
    assert all(s.tokens_per_sec > 0 and math.isfinite(s.train_perplexity) for s in reports)
    assert [e.epoch for e in epochs] == [1, 2]  # epochs are reported as before, once each


def test_progress_line_shows_steps_epoch_speed_and_time_left() -> None:
    inside = StepStats(
        step=1200,
        total_steps=5000,
        epoch=2,
        epochs=10,
        batch=40,
        batches=90,
        train_perplexity=8.1234,
        tokens_per_sec=25000.4,
        eta_seconds=3725.0,
        heldout_perplexity=9.012,
    )
    assert progress_line(inside) == (
        "step 1,200/5,000 (24%), epoch 2/10, batch 40/90: train ppl 8.123, held-out ppl 9.01, "
        "25,000 tokens/s, ETA 1h02m"
    )
    end = StepStats(
        step=30,
        total_steps=30,
        epoch=2,
        epochs=2,
        batch=15,
        batches=15,
        train_perplexity=5.0,
        tokens_per_sec=900.0,
        eta_seconds=0.0,
        epoch_end=True,
    )
    assert progress_line(end) == "step 30/30 (100%), epoch 2/2: train ppl 5.000, 900 tokens/s, ETA 0s"


@pytest.mark.parametrize(
    "seconds, text",
    [
        (None, "?"),
        (math.inf, "?"),
        (-1.0, "?"),
        (0.4, "0s"),
        (59.4, "59s"),
        (61, "1m01s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (86399, "23h59m"),
        (2 * 86400 + 4 * 3600, "2d04h"),
    ],
)
def test_format_duration_short(seconds: float | None, text: str) -> None:
    assert format_duration(seconds, short=True) == text


@pytest.mark.parametrize(
    "seconds, text",
    [(None, "?"), (0.0, "0s"), (30, "30s"), (90, "1m30s"), (120, "2m"), (3600, "1h"), (3725.4, "1h2m5s")],
)
def test_format_duration_writes_what_parse_duration_reads(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text
    if seconds is not None:
        assert parse_duration(text) == round(seconds)


def test_eta_from_the_pace_so_far() -> None:
    assert eta_seconds(100, 400, 50.0) == 150.0  # 300 steps left at 0.5 s each
    assert eta_seconds(400, 400, 50.0) == 0.0
    assert eta_seconds(0, 400, 0.0) is None  # no pace yet


@pytest.mark.parametrize("preset", ["d2l-9.3", "full-book"])
def test_the_default_cap_reads_every_preset_heldout_split_of_the_book_whole(
    preset: str, book_tokens: list[str]
) -> None:
    # The cap bounds evaluations on large corpora; on the book it must change nothing.
    config = preset_config(preset)
    n = len(book_tokens)
    splits = split_corpus(torch.arange(n), config.data.val_fraction, config.data.test_fraction, config.data.max_tokens)
    heldout = splits.val if splits.val.numel() else splits.test
    assert config.train.eval_max_tokens is not None and heldout.numel() < config.train.eval_max_tokens
    assert config.train.final_eval_max_tokens is None  # the reported perplexities read the whole splits


def test_the_smoke_preset_caps_its_evaluations_to_stay_seconds_on_any_corpus() -> None:
    train = preset_config("smoke").train
    assert train.eval_max_tokens == 10_000 and train.final_eval_max_tokens == 20_000
