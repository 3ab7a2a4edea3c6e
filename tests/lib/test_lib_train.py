"""deeprnn.training.loop.Trainer on tiny text: learning, callbacks, divergence, bit-for-bit resume, best epoch,
options."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from deeprnn.config import RunConfig, preset_config
from deeprnn.data.batching import CorpusTooShortError, gather_rows, random_starts
from deeprnn.data.vocab import Vocab
from deeprnn.evaluate import perplexity
from deeprnn.model import RNNLM
from deeprnn.training import checkpoint
from deeprnn.training.divergence import TrainingDivergedError
from deeprnn.training.loop import Trainer
from deeprnn.training.progress import EpochStats
from deeprnn.training.step import clip_grad_norm_

CPU = torch.device("cpu")


def _cfg(**train: Any) -> RunConfig:
    model = train.pop("model", {})
    base = {"epochs": 3, "device": "cpu", "eval_every": 1000, "log_every": 1}
    return preset_config("smoke", {"model": {"num_hiddens": 16, **model}, "train": {**base, **train}})


def _trainer(vocab: Vocab, ids: torch.Tensor, cfg: RunConfig, seed: int = 0, **kwargs: Any) -> Trainer:
    torch.manual_seed(seed)
    model = RNNLM.from_config(len(vocab), cfg.model)
    return Trainer(model, ids, cfg.train, CPU, **kwargs)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_loss_decreases(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    # SGD on this tiny text stalls near the unigram perplexity for a while; Adam gets past it in seconds.
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=8, optimizer="adam", lr=0.01))
    result = trainer.fit()
    ppl = [h.train_perplexity for h in result.history]
    assert [h.epoch for h in result.history] == list(range(1, 9))
    assert all(math.isfinite(p) for p in ppl)
    assert ppl[-1] < 0.8 * ppl[0], ppl
    assert ppl[-1] < min(ppl[:4]), ppl  # still improving after the first epochs
    assert result.epochs_done == 8 == trainer.epoch
    assert result.final_train_perplexity == ppl[-1]
    assert result.step_mode == "eager"  # no CUDA graphs on the CPU
    assert result.best_epoch is None and result.best_heldout_perplexity is None
    assert all(h.tokens_per_sec > 0 and h.seconds > 0 for h in result.history)
    json.dumps(dataclasses.asdict(result))  # JSON-ready, for MLflow and Prefect


def test_callbacks_every_epoch_in_order_and_checkpoints(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    events: list[tuple[str, int]] = []
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=5, log_every=3))
    result = trainer.fit(
        on_epoch=lambda s: events.append(("epoch", s.epoch)),
        on_checkpoint=lambda e: events.append(("checkpoint", e)),
        checkpoint_every=2,
    )
    assert [e for kind, e in events if kind == "epoch"] == [1, 2, 3, 4, 5]
    assert [e for kind, e in events if kind == "checkpoint"] == [2, 4, 5]
    # A checkpoint comes after the epoch it saves has been reported.
    for kind, e in events:
        if kind == "checkpoint":
            assert events.index(("epoch", e)) < events.index(("checkpoint", e))
    assert all(isinstance(h, EpochStats) for h in result.history)

    events.clear()
    _trainer(tiny_vocab, tiny_ids, _cfg(epochs=3)).fit(on_checkpoint=lambda e: events.append(("checkpoint", e)))
    assert events == [("checkpoint", 3)]  # at the end only, by default


def test_nan_weights_raise_naming_the_epoch(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=5))

    def poison(stats: EpochStats) -> None:
        if stats.epoch == 2:
            with torch.no_grad():
                trainer.model.linear.weight[0, 0] = float("nan")

    seen: list[int] = []
    with pytest.raises(TrainingDivergedError) as info:
        trainer.fit(on_epoch=lambda s: (seen.append(s.epoch), poison(s)))
    assert info.value.epoch == 3
    assert "epoch 3" in str(info.value) and "nan" in str(info.value)
    assert seen == [1, 2]


def test_nan_from_the_start_names_epoch_1(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=3, log_every=10))
    with torch.no_grad():
        trainer.model.rnn.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match="training diverged at epoch 1:") as info:
        trainer.fit()
    assert info.value.epoch == 1


def test_resume_is_bit_for_bit(tiny_vocab: Vocab, tiny_ids: torch.Tensor, tmp_path: Path) -> None:
    # Dropout makes the run depend on torch's generator, the offsets on the Python one: both must resume.
    overrides = {"model": {"dropout": 0.3}, "optimizer": "adam", "lr": 0.01}
    cfg4 = _cfg(epochs=4, **dict(overrides, model=dict(overrides["model"])))
    straight = _trainer(tiny_vocab, tiny_ids, cfg4)
    straight.fit()

    cfg2 = _cfg(epochs=2, **dict(overrides, model=dict(overrides["model"])))
    first = _trainer(tiny_vocab, tiny_ids, cfg2)
    first.fit()
    path = checkpoint.save(
        tmp_path / "ckpt.pt",
        checkpoint.make_payload(cfg2, tiny_vocab, first.model, epoch=2, trainer_state=first.state_dict()),
    )
    torch.manual_seed(999)  # whatever happens in between must not matter
    random.random()

    data = checkpoint.load(path)
    model = RNNLM.from_config(len(tiny_vocab), cfg4.model)
    model.load_state_dict(data["model_state"])
    resumed = Trainer(model, tiny_ids, cfg4.train, CPU)
    resumed.load_state_dict(data["trainer_state"])
    assert resumed.epoch == 2
    result = resumed.fit()
    assert [h.epoch for h in result.history] == [3, 4]

    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    assert resumed.rng.getstate() == straight.rng.getstate()
    # The same continuation, not merely the same start: the weights did move after the resume.
    assert not torch.equal(resumed.model.linear.weight, first.model.linear.weight)


def test_select_best_restores_the_best_epoch(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    val = tiny_ids[-400:]
    train = tiny_ids[:-400]
    cfg = _cfg(epochs=5, eval_every=1, lr=0.05)
    for select_best in (True, False):
        trainer = _trainer(tiny_vocab, train, cfg, heldout_ids=val, select_best=select_best)
        snapshots: dict[int, dict[str, torch.Tensor]] = {}

        def on_epoch(stats: EpochStats, trainer: Trainer = trainer) -> None:
            snapshots[stats.epoch] = _weights(trainer.model)  # noqa: B023 - runs inside this iteration
            if stats.epoch == 2:  # wreck the model after epoch 2 was measured: later epochs are worse
                with torch.no_grad():
                    trainer.model.linear.bias[0] = 50.0

        result = trainer.fit(on_epoch=on_epoch)
        heldout = {h.epoch: h.heldout_perplexity for h in result.history}
        assert all(v is not None for v in heldout.values())
        best = min(heldout, key=heldout.get)
        assert best <= 2 and result.best_epoch == best
        assert result.best_heldout_perplexity == heldout[best]
        chosen = snapshots[best] if select_best else snapshots[5]
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(value, chosen[name]), (select_best, name)
        assert perplexity(trainer.model, val, rows=cfg.train.batch_size) == pytest.approx(
            heldout[best] if select_best else heldout[5], rel=1e-6
        )


def test_heldout_evaluated_every_eval_every_and_at_the_end(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    trainer = _trainer(tiny_vocab, tiny_ids[:-300], _cfg(epochs=5, eval_every=2), heldout_ids=tiny_ids[-300:])
    result = trainer.fit()
    assert [h.epoch for h in result.history if h.heldout_perplexity is not None] == [2, 4, 5]
    assert result.history[-1].heldout_perplexity == pytest.approx(
        perplexity(trainer.model, tiny_ids[-300:], rows=8), rel=1e-6
    )
    assert trainer.model.training  # evaluation hands the model back in training mode


def test_random_partition_equals_a_plain_loop(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    cfg = _cfg(epochs=1, partition="random", fast=False)
    trainer = _trainer(tiny_vocab, tiny_ids, cfg)
    torch.manual_seed(0)
    model = RNNLM.from_config(len(tiny_vocab), cfg.model)
    result = trainer.fit()

    # The book's random partitioning: a fresh zero state for every minibatch.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    xs, ys = gather_rows(tiny_ids, random_starts(tiny_ids.numel(), 8, 16, random.Random(cfg.train.seed)), 16)
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        logits, _ = model(x, model.begin_state(8, CPU))
        loss = F.cross_entropy(logits, y.T.reshape(-1))
        loss.backward()
        clip_grad_norm_([p.grad for p in model.parameters()], cfg.train.clip_norm)
        opt.step()
        losses.append(loss.item())
    assert result.history[0].train_perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_cosine_schedule(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=4, lr=0.8, lr_schedule="cosine"))
    result = trainer.fit()
    expected = [0.8 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [h.lr for h in result.history] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == 0.8 and expected == sorted(expected, reverse=True)
    assert trainer.train_step.optimizer.param_groups[0]["lr"] == pytest.approx(expected[-1])
    constant = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=2, lr=0.8))
    assert [h.lr for h in constant.fit().history] == [0.8, 0.8]


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_and_adamw_train(tiny_vocab: Vocab, tiny_ids: torch.Tensor, name: str, cls: type) -> None:
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=4, optimizer=name, lr=0.01, weight_decay=0.01))
    before = _weights(trainer.model)
    result = trainer.fit()
    assert type(trainer.train_step.optimizer) is cls
    assert trainer.train_step.optimizer.param_groups[0]["weight_decay"] == 0.01
    assert all(math.isfinite(h.train_perplexity) for h in result.history)
    assert result.history[-1].train_perplexity < result.history[0].train_perplexity
    assert not torch.equal(before["linear.weight"], trainer.model.linear.weight)


def test_fast_path_keeps_the_numbers(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    a = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=2, fast=True))
    b = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=2, fast=False))
    ra, rb = a.fit(), b.fit()
    assert [h.train_perplexity for h in ra.history] == pytest.approx([h.train_perplexity for h in rb.history], rel=1e-5)
    for name, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_fit_when_already_done_trains_nothing(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    trainer = _trainer(tiny_vocab, tiny_ids, _cfg(epochs=1))
    trainer.fit()
    before = _weights(trainer.model)
    result = trainer.fit()
    assert result.history == [] and result.epochs_done == 1 and math.isnan(result.final_train_perplexity)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())


def test_too_short_text_is_refused(tiny_vocab: Vocab, tiny_ids: torch.Tensor) -> None:
    with pytest.raises(CorpusTooShortError, match="batch_size 8 x num_steps 16"):
        _trainer(tiny_vocab, tiny_ids[:100], _cfg())
