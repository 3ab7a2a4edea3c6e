"""deeprnn.evaluate: perplexity = exp(token-weighted mean cross-entropy), overflow-safe, chunking-invariant."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deeprnn.evaluate import loss_sum, perplexity, perplexity_from_loss
from deeprnn.model import RNNLM

CPU = torch.device("cpu")


def test_perplexity_from_loss() -> None:
    assert perplexity_from_loss(0.0) == 1.0
    assert perplexity_from_loss(2.0) == pytest.approx(math.e**2, rel=1e-15)
    assert perplexity_from_loss(700.0) == pytest.approx(math.exp(700.0))
    assert perplexity_from_loss(710.0) == math.inf  # math.exp would raise OverflowError
    assert perplexity_from_loss(1e9) == math.inf
    assert perplexity_from_loss(math.inf) == math.inf
    assert math.isnan(perplexity_from_loss(math.nan))


@pytest.fixture()
def model(tiny_vocab) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(len(tiny_vocab), num_hiddens=16, num_layers=2)


def _by_hand(model: RNNLM, streams_x: torch.Tensor, streams_y: torch.Tensor) -> float:
    """Sum of per-token cross-entropies, each stream read from a zero state in one piece, over all targets."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in zip(streams_x, streams_y):
            logits, _ = model(x[None], model.begin_state(1, CPU))  # (L, V)
            total += F.cross_entropy(logits, y, reduction="sum").double().item()
            count += y.numel()
    return math.exp(total / count)


def test_rows_1_equals_exp_of_mean_cross_entropy(model: RNNLM, tiny_ids: torch.Tensor) -> None:
    ids = tiny_ids[:301]
    expected = _by_hand(model, ids[None, :-1], ids[None, 1:])
    for chunk in (1, 7, 64, 300, 512):
        assert perplexity(model, ids, rows=1, chunk=chunk) == pytest.approx(expected, rel=1e-5), chunk


def test_token_weighted_over_several_rows(model: RNNLM, tiny_ids: torch.Tensor) -> None:
    ids = tiny_ids[:302]  # 301 targets: 3 rows of 100, the last target dropped
    rows_x = ids[:300].reshape(3, 100)
    rows_y = ids[1:301].reshape(3, 100)
    expected = _by_hand(model, rows_x, rows_y)
    total, count = loss_sum(model, ids, rows=3, chunk=16)
    assert count == 300
    assert total.dtype == torch.float64
    assert math.exp(total.item() / count) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, rows=3, chunk=16) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, rows=3, chunk=1000) == pytest.approx(expected, rel=1e-5)


def test_chunk_does_not_change_the_result(model: RNNLM, tiny_ids: torch.Tensor) -> None:
    values = [perplexity(model, tiny_ids, rows=4, chunk=c) for c in (3, 17, 50, 10_000)]
    assert max(values) - min(values) <= 1e-5 * values[0]
    assert 1.0 < values[0] < 2 * len(torch.unique(tiny_ids))  # an untrained model: about the vocabulary size


def test_mode_is_restored_and_dropout_is_off(tiny_vocab, tiny_ids: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = RNNLM(len(tiny_vocab), num_hiddens=16, num_layers=2, dropout=0.5)
    model.train()
    a = perplexity(model, tiny_ids, rows=2)
    b = perplexity(model, tiny_ids, rows=2)
    assert a == b  # measured in eval mode: no dropout noise
    assert model.training
    model.eval()
    perplexity(model, tiny_ids, rows=2)
    assert not model.training


def test_needs_two_tokens(model: RNNLM) -> None:
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(model, torch.tensor([3]))
    assert perplexity(model, torch.tensor([3, 4])) > 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_small_integer_ids_give_the_same_perplexity(model: RNNLM, tiny_ids: torch.Tensor, dtype: torch.dtype) -> None:
    total, count = loss_sum(model, tiny_ids, rows=4, chunk=37)
    narrow_total, narrow_count = loss_sum(model, tiny_ids.to(dtype), rows=4, chunk=37)
    assert count == narrow_count and torch.equal(total, narrow_total)


def test_max_tokens_reads_the_first_n_tokens_only(model: RNNLM, tiny_ids: torch.Tensor) -> None:
    ids = tiny_ids[:600].clone()
    capped = perplexity(model, ids, rows=4, max_tokens=201)
    assert capped == perplexity(model, ids[:201], rows=4)
    assert capped != perplexity(model, ids, rows=4)
    ids[201:] = (ids[201:] + 1) % int(ids.max() + 1)  # change everything after the first 201 tokens
    assert perplexity(model, ids, rows=4, max_tokens=201) == capped
    assert perplexity(model, ids, rows=4, max_tokens=10_000) == perplexity(model, ids, rows=4)  # cap above the size
