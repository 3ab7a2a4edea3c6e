"""The training step against the book's own loop (D2L 8.5 ``train_epoch_ch8``, ``grad_clipping``)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from deeprnn.config import preset_config
from deeprnn.model import RNNLM
from deeprnn.training.loop import Trainer
from deeprnn.training.step import clip_grad_norm_

pytestmark = [
    pytest.mark.d2l,
    # d2l's Accumulator calls float() on the loss tensor that still requires grad; harmless, and not ours.
    pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar"),
]

CPU = torch.device("cpu")
HIDDEN = 256  # the book's width; 64 gives the same agreement in a third of the time


# ----- gradient clipping ----------------------------------------------------------------------------


def _net_with_grads(scale: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.LSTM(5, 7, 2), nn.Linear(7, 3))
    for p in net.parameters():
        p.grad = torch.randn_like(p) * scale
    return net


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_equals_grad_clipping_when_norm_exceeds_theta(d2l, seed: int) -> None:
    net = _net_with_grads(10.0, seed)
    before = [p.grad.clone() for p in net.parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in before))
    assert norm > 1.0
    d2l.grad_clipping(net, 1)
    book = [p.grad.clone() for p in net.parameters()]

    grads = [g.clone() for g in before]
    total = clip_grad_norm_(grads, 1.0)
    torch.testing.assert_close(total, norm, rtol=1e-6, atol=0)
    for mine, theirs in zip(grads, book):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-9)
    assert math.isclose(torch.sqrt(sum((g**2).sum() for g in grads)).item(), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("theta", [1.0, 5.0])
def test_clip_leaves_small_gradients_bit_for_bit_unchanged(d2l, theta: float) -> None:
    net = _net_with_grads(1e-3, 0)
    before = [p.grad.clone() for p in net.parameters()]
    d2l.grad_clipping(net, theta)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), before))  # the book: no-op

    grads = [g.clone() for g in before]
    total = clip_grad_norm_(grads, theta)
    assert total.item() <= theta
    assert all(torch.equal(a, b) for a, b in zip(grads, before))


def test_clip_with_zero_gradients_stays_finite() -> None:
    grads = [torch.zeros(3), torch.zeros(2, 2)]
    total = clip_grad_norm_(grads, 1.0)
    assert total.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 and torch.isfinite(g).all() for g in grads)


# ----- whole epochs ---------------------------------------------------------------------------------


@pytest.fixture()
def train_data(book_tokens: list[str], book_vocab) -> tuple[torch.Tensor, int]:
    """The corpus's first 10,000 training tokens (the book's, or the stand-in's)."""
    return torch.tensor(book_vocab.encode(book_tokens[:10000])), len(book_vocab)


def test_trainer_epochs_equal_train_epoch_ch8(d2l, train_data, monkeypatch: pytest.MonkeyPatch) -> None:
    train_ids, vocab_size = train_data
    offsets = [5, 35]  # one fresh offset per epoch; 35 is the largest the book draws
    # The book's model (2 x 256 LSTM), batch (32 x 35), SGD(lr=2) and clipping at 1.
    torch.manual_seed(0)
    book = d2l.RNNModel(nn.LSTM(vocab_size, HIDDEN, 2), vocab_size)
    mine = RNNLM(vocab_size, num_hiddens=HIDDEN)
    mine.load_state_dict(book.state_dict())

    # The book: SGD(lr=2), clipping at 1, state carried within an epoch and reset between epochs.
    updater = torch.optim.SGD(book.parameters(), 2)
    book_ppl = []
    for offset in offsets:
        monkeypatch.setattr(d2l, "random", types.SimpleNamespace(randint=lambda a, b, o=offset: o))
        batches = list(d2l.seq_data_iter_sequential(train_ids.tolist(), 32, 35))
        ppl, _ = d2l.train_epoch_ch8(book, batches, nn.CrossEntropyLoss(), updater, CPU, False)
        book_ppl.append(ppl)

    cfg = preset_config("d2l-9.3", {"model": {"num_hiddens": HIDDEN}, "train": {"epochs": len(offsets), "fast": False}})
    assert (cfg.train.batch_size, cfg.train.num_steps, cfg.train.lr, cfg.train.clip_norm) == (32, 35, 2.0, 1.0)
    trainer = Trainer(mine, train_ids, cfg.train, CPU)
    drawn = iter(offsets)
    asked: list[tuple[int, int]] = []

    def randint(a: int, b: int) -> int:
        asked.append((a, b))
        return next(drawn)

    trainer.rng.randint = randint  # type: ignore[method-assign]
    result = trainer.fit()

    assert asked == [(0, 35)] * len(offsets)
    assert [h.epoch for h in result.history] == [1, 2]
    for h, ppl in zip(result.history, book_ppl):
        assert math.isclose(h.train_perplexity, ppl, rel_tol=1e-5), (h.train_perplexity, ppl)
        assert h.lr == 2.0
    book_state = book.state_dict()
    for name, value in mine.state_dict().items():
        torch.testing.assert_close(value, book_state[name], rtol=1e-5, atol=1e-5, msg=name)
    # Training did move the weights (so the comparison above is not between two untouched models).
    torch.manual_seed(0)
    untouched = RNNLM(vocab_size, num_hiddens=HIDDEN)
    assert not torch.allclose(untouched.linear.weight, mine.linear.weight, atol=1e-3)
