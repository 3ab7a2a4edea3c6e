"""Your own text in one command, in the library: the text preset and how a run picks it, durations, the size
rule, prefixes drawn from the held-out text, the time budget and its schedule, early stopping, and
checkpoints by time."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from deeprnn.config import D2L_URL, RunConfig, TrainConfig, default_preset, preset_config
from deeprnn.data.batching import check_enough_tokens, split_corpus
from deeprnn.data.vocab import Vocab
from deeprnn.model import RNNLM
from deeprnn.sizing import (
    WIDTHS,
    batch_shape,
    decided_later,
    draw_prefixes,
    rows_for_steps,
    size_model,
    size_to_text,
    weights,
)
from deeprnn.training.loop import Trainer
from deeprnn.training.schedule import Schedule

CPU = torch.device("cpu")


# ----- the preset and how a run picks it --------------------------------------------------------------


def test_the_book_keeps_its_preset_and_any_other_text_gets_the_text_preset() -> None:
    assert default_preset(None) == default_preset(D2L_URL) == "d2l-9.3"
    assert default_preset("faust.txt") == default_preset("https://example.org/faust.txt") == "text"
    text = preset_config("text", {"data": {"url": "faust.txt"}})
    assert (text.data.normalize, text.data.max_tokens, text.data.val_fraction) == ("none", None, 0.05)
    assert text.data.test_fraction == 0.1 and text.model.size == "auto"
    assert (text.train.optimizer, text.train.lr_schedule, text.train.time_budget) == (
        "adamw",
        "warmup-stable-decay",
        300,
    )
    assert text.sample.prefixes == []  # drawn from the held-out text once it is prepared


def test_prefixes_are_the_books_for_the_book_and_drawn_for_any_other_text_unless_given() -> None:
    assert preset_config("d2l-9.3").sample.prefixes == ["time traveller", "traveller"]
    assert preset_config("d2l-9.3", {"data": {"url": "faust.txt"}}).sample.prefixes == []
    given = preset_config("smoke", {"data": {"url": "faust.txt"}, "sample": {"prefixes": ["Habe nun"]}})
    assert given.sample.prefixes == ["Habe nun"]


def test_a_shape_the_user_gives_turns_auto_sizing_off_and_is_kept() -> None:
    assert preset_config("text", {"model": {"num_hiddens": 512}}).model.size == "fixed"
    assert preset_config("text", {"model": {"num_hiddens": 512}}).model.num_hiddens == 512
    assert preset_config("text", {"model": {"num_hiddens": 512, "size": "auto"}}).model.size == "auto"
    assert preset_config("text", {"train": {"lr": 1e-3}}).model.size == "auto"


@pytest.mark.parametrize(("text", "seconds"), [("2m", 120.0), ("90s", 90.0), ("1h", 3600.0), ("1h30m", 5400.0)])
def test_a_time_budget_is_written_as_people_write_durations(text: str, seconds: float) -> None:
    assert TrainConfig(time_budget=text).time_budget == seconds
    assert TrainConfig(time_budget=seconds).time_budget == seconds


@pytest.mark.parametrize("off", ["off", None])
def test_a_time_budget_can_be_switched_off(off: str | None) -> None:
    assert TrainConfig(time_budget=off).time_budget is None
    assert preset_config("text", {"train": {"time_budget": off}}).train.time_budget is None


@pytest.mark.parametrize("text", ["2 minutes", "m", "-5s", "1h 30", "0", ""])
def test_a_time_budget_that_is_not_a_duration_is_refused_naming_the_forms(text: str) -> None:
    with pytest.raises(ValidationError, match="time_budget"):
        TrainConfig(time_budget=text)


# ----- the size rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "embedding", "layers"), [("lstm", 64, 2), ("gru", None, 1), ("rnn", 32, 3)])
def test_the_weight_count_is_the_models_own(cell: str, embedding: int | None, layers: int) -> None:
    cfg = preset_config("smoke", {"model": {"cell": cell, "embedding_dim": embedding, "num_layers": layers}})
    model = RNNLM.from_config(97, cfg.model)
    assert weights(97, cfg.model) == sum(p.numel() for p in model.parameters())


def test_the_model_grows_with_the_text_and_never_has_more_weights_than_training_tokens() -> None:
    config = preset_config("text", {"train": {"time_budget": None}})
    chosen = []
    for tokens in (20_000, 300_000, 1_000_000, 3_000_000, 100_000_000):
        model, _, note = size_model(config, tokens, 80, CPU)  # no budget: nothing measured
        sized = config.model.model_copy(update={k: v for k, v in model.items() if k != "size"})
        assert sized.num_hiddens == WIDTHS[0] or weights(80, sized) <= tokens
        assert model["size"] == "fixed" and f"{tokens:,} training tokens" in note
        chosen.append(sized.num_hiddens)
    assert chosen == sorted(chosen) and chosen[0] == WIDTHS[0] and chosen[-1] == WIDTHS[-1]


def test_a_short_time_budget_affords_a_smaller_model_than_the_data_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from deeprnn import sizing

    # A device that trains 100,000 tokens a second whatever the size: 1 s affords 50,000 weights, 1 h all.
    monkeypatch.setattr(sizing, "measure_throughput", lambda *args, **kwargs: 100_000.0)
    config = preset_config("text")
    short, _, _ = size_model(
        config.model_copy(update={"train": config.train.model_copy(update={"time_budget": 1.0})}), 10**8, 80, CPU
    )
    long, _, _ = size_model(
        config.model_copy(update={"train": config.train.model_copy(update={"time_budget": 3600.0})}), 10**8, 80, CPU
    )
    assert short["num_hiddens"] == WIDTHS[0] and long["num_hiddens"] == WIDTHS[-1]


@pytest.mark.parametrize("tokens", [300, 1_000, 5_000, 40_000, 10**6])
def test_the_batch_shape_fits_a_short_text(tokens: int) -> None:
    rows, steps = batch_shape(tokens, 32, 64)
    check_enough_tokens(tokens, rows, steps)  # raises when one minibatch cannot be filled
    assert (rows, steps) == (32, 64) or tokens < 32 * 64 * 16


@pytest.mark.parametrize(("rate", "rows"), [(1e3, 8), (30e3, 8), (60e3, 16), (200e3, 32), (1e9, 32)])
def test_a_short_budget_on_a_cpu_halves_the_batch_for_more_steps(rate: float, rows: int) -> None:
    config = preset_config("text", {"train": {"time_budget": "2m"}})
    assert config.train.min_planned_steps == 4000

    def cpu(n: int) -> float:  # as many tokens a second whatever the rows
        return rate

    # Halved until 2 minutes plan 4,000 steps, never below 8 rows; a batch already below 8 rows is never cut.
    assert rows_for_steps(rate, config, 32, 64, cpu) == (rows, rate)
    assert rows_for_steps(rate, config, 6, 64, cpu) == (6, rate)


def test_a_device_whose_step_time_does_not_depend_on_the_rows_keeps_them() -> None:
    config = preset_config("text", {"train": {"time_budget": "2m"}})
    asked = []

    def gpu(n: int) -> float:  # a step takes as long with 16 rows as with 32: half the tokens a second
        asked.append(n)
        return 30e3 * n / 32

    assert rows_for_steps(30e3, config, 32, 64, gpu) == (32, 30e3)
    assert asked == [16, 32, 16]  # half the rows, then both again to rule out a busy moment; no more


def test_a_half_batch_slowed_by_a_busy_moment_is_measured_again_before_the_rows_are_kept() -> None:
    config = preset_config("text", {"train": {"time_budget": "2m"}})
    probes = iter([10e3, 30e3, 30e3, 30e3, 30e3, 30e3])  # the first probe of 16 rows lands in a busy second

    def cpu(n: int) -> float:
        return next(probes)

    assert rows_for_steps(30e3, config, 32, 64, cpu) == (8, 30e3)


def test_a_batch_the_user_gives_is_kept_and_the_book_keeps_its_own() -> None:
    assert preset_config("text", {"train": {"batch_size": 64}}).train.min_planned_steps == 0
    asked = preset_config("text", {"train": {"batch_size": 64, "min_planned_steps": 100}})
    assert asked.train.min_planned_steps == 100
    for name in ("d2l-9.3", "full-book", "smoke"):
        assert preset_config(name, {"train": {"time_budget": "2m"}}).train.min_planned_steps == 0
    unbounded = preset_config("text", {"train": {"time_budget": None}})  # no budget: no steps to plan
    assert "train.min_planned_steps" not in decided_later(unbounded)


@pytest.mark.parametrize("size", ["auto", "fixed"])
def test_the_sized_batch_follows_the_measured_throughput_and_is_decided_once(size: str) -> None:
    text = _lines(3, 3000)
    vocab = Vocab(list(text))
    ids = torch.tensor(vocab.encode(list(text)))
    # The narrowest model the text preset sizes: on a CPU, half of 32 rows train most of the tokens a second 32
    # do, so a short budget halves them; how far (16 or 8) depends on how busy the machine is while it measures.
    model = {"size": size, "num_hiddens": 128, "num_layers": 2, "embedding_dim": 128}
    for budget, rows in ((1.0, {8, 16}), (30 * 86400.0, {32})):  # no CPU plans 4,000 steps in 1 s; a month does
        config = preset_config("text", {"model": model, "train": {"time_budget": budget}})
        assert {"train.batch_size", "train.min_planned_steps"} <= decided_later(config)
        sized = size_to_text(config, ids, vocab, CPU)
        assert sized.config.train.batch_size in rows and sized.config.train.min_planned_steps == 0
        assert f"batch {sized.config.train.batch_size} x 64: about" in " ".join(sized.notes)
        # A resumed run continues the checkpoint's sized configuration: nothing is left to decide again.
        assert not {"train.batch_size", "model.size"} & decided_later(sized.config)


def test_the_throughput_probe_measures_a_real_model() -> None:
    from deeprnn.sizing import measure_throughput

    cfg = preset_config("smoke").model
    assert measure_throughput(cfg, 50, 4, 8, CPU, 1e-3) > 0


# ----- prefixes from the held-out text ----------------------------------------------------------------


def _lines(seed: int, count: int) -> str:
    rng = random.Random(seed)
    words = "Habe nun ach Philosophie Juristerei und Medizin auch leider Theologie durchaus studiert".split()
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + "\n" for _ in range(count))


def test_prefixes_are_starts_of_held_out_lines_and_the_same_for_a_seed() -> None:
    text = _lines(0, 400)
    vocab = Vocab(list(text))
    ids = torch.tensor(vocab.encode(list(text)))
    heldout = split_corpus(ids, 0.05, 0.1, None).test
    heldout_text = vocab.decode(heldout.tolist())
    prefixes = draw_prefixes(heldout, vocab, "char", seed=3)
    assert len(prefixes) == 3
    for prefix in prefixes:
        assert ("\n" + prefix) in heldout_text and len(prefix.split()) == 2
    assert draw_prefixes(heldout, vocab, "char", seed=3) == prefixes
    assert any(draw_prefixes(heldout, vocab, "char", seed=s) != prefixes for s in range(4, 10))


def test_a_text_without_spaces_gives_its_first_characters_and_one_without_lines_starts_of_words() -> None:
    text = "".join("其它行必须包含一个字段"[i % 11] for i in range(500)).join(["", ""])
    chinese = "\n".join(text[i : i + 25] for i in range(0, len(text), 25)) + "\n"
    vocab = Vocab(list(chinese))
    prefixes = draw_prefixes(torch.tensor(vocab.encode(list(chinese))), vocab, "char", seed=0)
    assert prefixes and all(len(p) == 8 and p in chinese for p in prefixes)
    joined = _lines(1, 50).replace("\n", " ")
    vocab = Vocab(list(joined))
    prefixes = draw_prefixes(torch.tensor(vocab.encode(list(joined))), vocab, "char", seed=0)
    assert prefixes and all((" " + p + " ") in joined for p in prefixes)


def test_sizing_to_the_book_keeps_the_books_prefixes(tiny_text: str) -> None:
    from deeprnn.config import D2L_SHA1

    config = preset_config("smoke", {"data": {"url": "local-copy.txt"}})
    vocab = Vocab(list(tiny_text))
    ids = torch.tensor(vocab.encode(list(tiny_text)))
    assert size_to_text(config, ids, vocab, CPU, corpus_sha1=D2L_SHA1).config.sample.prefixes == [
        "time traveller",
        "traveller",
    ]
    drawn = size_to_text(config, ids, vocab, CPU, corpus_sha1="0" * 40)
    assert drawn.config.sample.prefixes and drawn.config.sample.prefixes[0] in tiny_text
    assert "drawn from the held-out text" in drawn.notes[0]


# ----- the time budget, its schedule, early stopping, checkpoints by time ------------------------------


def _text_cfg(**train: Any) -> RunConfig:
    base = {"device": "cpu", "warmup_steps": 5, "eval_max_tokens": 2000, "log_every": 1000}
    return preset_config("text", {"model": {"num_hiddens": 24, "embedding_dim": 8}, "train": {**base, **train}})


def _trainer(ids: torch.Tensor, vocab: Vocab, cfg: RunConfig) -> Trainer:
    torch.manual_seed(0)
    splits = split_corpus(ids, cfg.data.val_fraction, cfg.data.test_fraction, None)
    model = RNNLM.from_config(len(vocab), cfg.model)
    return Trainer(model, splits.train, cfg.train, CPU, heldout_ids=splits.val, select_best=True)


@pytest.fixture(scope="module")
def text_ids() -> tuple[torch.Tensor, Vocab]:
    text = _lines(7, 3000)
    vocab = Vocab(list(text))
    return torch.tensor(vocab.encode(list(text)), dtype=torch.uint8), vocab


def test_warmup_cosine_rises_then_decays_to_a_tenth_over_the_plan() -> None:
    cfg = TrainConfig(lr=1.0, lr_schedule="warmup-cosine", warmup_steps=10, max_steps=200, epochs=1000)
    schedule = Schedule(cfg, evaluates=False, checkpoints=False, batches_per_epoch=50)
    lrs = [schedule.step_lr(s) for s in range(200)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_warmup_stable_decay_holds_the_peak_then_decays_over_the_last_fifth() -> None:
    cfg = TrainConfig(lr=1.0, lr_schedule="warmup-stable-decay", warmup_steps=10, max_steps=200, epochs=1000)
    schedule = Schedule(cfg, evaluates=False, checkpoints=False, batches_per_epoch=50)
    lrs = [schedule.step_lr(s) for s in range(200)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:160] == [1.0] * 150  # the stable phase: the peak until 80% of the plan
    assert lrs[-1] == pytest.approx(0.1, abs=2e-3) and all(a >= b for a, b in zip(lrs[160:], lrs[161:]))


def test_a_short_time_budget_ends_on_time_with_the_schedule_completed(text_ids: tuple[torch.Tensor, Vocab]) -> None:
    ids, vocab = text_ids
    budget = 6.0
    trainer = _trainer(ids, vocab, _text_cfg(time_budget=budget, evaluations=4, patience=None))
    steps: list[Any] = []
    started = time.perf_counter()
    result = trainer.fit(on_step=steps.append)
    elapsed = time.perf_counter() - started
    assert result.stop_reason == "time_budget"
    assert budget * 0.85 <= elapsed <= budget * 1.05 + 0.5, elapsed
    last_lr = result.history[-1].lr
    # The cosine ran (nearly) to its end: the plan matched the time. On a busy runner the last step can come
    # a few steps before the plan's end (0.155 of the peak was seen); a plan far off ends near the peak.
    assert last_lr <= 0.2 * 3e-3, last_lr
    assert result.evaluations >= 2 and result.best_step is not None
    assert steps[-1].total_steps == result.steps_done  # the plan's last word is the steps actually taken


def test_a_plateau_stops_early_and_says_why(text_ids: tuple[torch.Tensor, Vocab]) -> None:
    ids, vocab = text_ids
    # A learning rate too small to change anything: the held-out perplexity stays where it starts.
    cfg = _text_cfg(time_budget=None, lr=1e-12, warmup_steps=0, epochs=50, evaluations=None, eval_every=1, patience=2)
    result = _trainer(ids, vocab, cfg).fit()
    assert result.stop_reason == "early_stopping"
    assert result.evaluations == 3 and result.epochs_done == 3 < 50
    assert "for 2 evaluations in a row" in result.stop_detail and "evaluation 3" in result.stop_detail


def test_checkpoints_come_by_time_as_well(text_ids: tuple[torch.Tensor, Vocab]) -> None:
    ids, vocab = text_ids
    cfg = _text_cfg(time_budget=3.0, checkpoint_every_minutes=0.01, evaluations=None)  # every 0.6 s
    trainer = _trainer(ids, vocab, cfg)
    stamps: list[float] = []
    trainer.fit(on_checkpoint=lambda epoch: stamps.append(time.perf_counter()))
    assert len(stamps) >= 3  # by time during the run, and at the end
    gaps = [b - a for a, b in zip(stamps, stamps[1:-1])]
    assert all(gap >= 0.6 for gap in gaps)


def test_a_resumed_run_continues_its_time_budget(text_ids: tuple[torch.Tensor, Vocab], tmp_path: Path) -> None:
    ids, vocab = text_ids
    cfg = _text_cfg(time_budget=3.0, evaluations=None)
    first = _trainer(ids, vocab, cfg)
    first.fit()
    state = first.state_dict()
    assert state["train_seconds"] >= 2.5
    second = _trainer(ids, vocab, cfg)
    second.load_state_dict(state)
    started = time.perf_counter()
    result = second.fit()
    assert time.perf_counter() - started < 1.0 and result.stop_reason == "time_budget"
    assert math.isfinite(second.spent_seconds)
