"""Stage 4: split the token ids and cut them into minibatches (D2L 8.3).

Sequential partitioning, the book's default, lays the training tokens out as ``batch_size`` parallel
streams, so row ``b`` of minibatch ``i+1`` continues row ``b`` of minibatch ``i`` and the hidden state can be
carried across minibatches::

    offset  <------------- num_tokens = (len - offset - 1) // B * B ------------->
    [.....][ stream 0: x x x x x x x x x | x x x x x x x x x | ... ]   Xs: (B, num_tokens / B)
           [ stream 1: x x x x x x x x x | x x x x x x x x x | ... ]
            <-- minibatch 0 (T steps) --> <-- minibatch 1 ----->

Y is X shifted by one token. Each epoch draws a fresh ``offset`` in ``[0, num_steps]``. Random partitioning
instead draws an offset in ``[0, num_steps - 1]`` and shuffles all length-T subsequences, so consecutive
minibatches are unrelated and the state is reset every minibatch.

Everything here works on tensors already on the training device, so an epoch's minibatches are views or a
single gather, never a per-step host-to-device copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from deeprnn.prepare import split_bounds


class CorpusTooShortError(ValueError):
    """The training tokens cannot fill one minibatch."""


@dataclass(frozen=True)
class Splits:
    """Token ids for training, validation (may be empty) and the held-out test part."""

    train: torch.Tensor  # (N_train,) token ids, any integer type
    val: torch.Tensor  # (N_val,)
    test: torch.Tensor  # (N_test,)


def split_corpus(ids: torch.Tensor, val_fraction: float, test_fraction: float, max_tokens: int | None) -> Splits:
    """Cut ``ids`` into ``[train | val | test]`` by fractions; training keeps at most its first ``max_tokens``.

    The test part is the end of the corpus, so the book's preset (first 10,000 tokens for training, last 10%
    held out) trains on exactly the tokens the book trains on and never sees the held-out text.
    """
    train_end, val_start, test_start = split_bounds(ids.numel(), val_fraction, test_fraction, max_tokens)
    return Splits(train=ids[:train_end], val=ids[val_start:test_start], test=ids[test_start:])


def min_tokens(batch_size: int, num_steps: int) -> int:
    """The fewest training tokens that give at least one minibatch for every random offset."""
    return batch_size * num_steps + num_steps + 1


def check_enough_tokens(num_tokens: int, batch_size: int, num_steps: int) -> None:
    """Raise ``CorpusTooShortError`` naming both numbers when ``num_tokens`` cannot fill one minibatch."""
    need = min_tokens(batch_size, num_steps)
    if num_tokens < need:
        raise CorpusTooShortError(
            f"the training text has {num_tokens} tokens, too few for one minibatch of batch_size {batch_size} x "
            f"num_steps {num_steps} (needs at least {need}): lower --batch-size or --num-steps, or use more text"
        )


def sequential_batches(
    corpus: torch.Tensor, batch_size: int, num_steps: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of the book's sequential minibatches for a given ``offset``.

    Returns ``X, Y`` of shape ``(num_batches, batch_size, num_steps)``; ``X[i]`` equals the book's i-th
    minibatch for the same offset.
    """
    num_tokens = ((corpus.numel() - offset - 1) // batch_size) * batch_size
    xs = corpus[offset : offset + num_tokens].reshape(batch_size, -1)  # (B, L)
    ys = corpus[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, -1)  # (B, L)
    num_batches = xs.shape[1] // num_steps
    used = num_batches * num_steps
    # (B, nb*T) -> (B, nb, T) -> (nb, B, T)
    x = xs[:, :used].reshape(batch_size, num_batches, num_steps).transpose(0, 1)
    y = ys[:, :used].reshape(batch_size, num_batches, num_steps).transpose(0, 1)
    return x, y


def random_batches(
    corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of the book's random minibatches, drawn with ``rng`` (offset, then a shuffle).

    Returns ``X, Y`` of shape ``(num_batches, batch_size, num_steps)``.
    """
    offset = rng.randint(0, num_steps - 1)
    num_subseqs = (corpus.numel() - offset - 1) // num_steps
    starts = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(starts)
    num_batches = num_subseqs // batch_size
    idx = torch.tensor(starts[: num_batches * batch_size], device=corpus.device).reshape(num_batches, batch_size)
    idx = idx + offset
    steps = torch.arange(num_steps, device=corpus.device)
    pos = idx[..., None] + steps  # (nb, B, T)
    return corpus[pos], corpus[pos + 1]


def epoch_batches(
    corpus: torch.Tensor, batch_size: int, num_steps: int, partition: str, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatches of one epoch for ``partition`` ('sequential' or 'random'), drawing from ``rng``."""
    if partition == "sequential":
        return sequential_batches(corpus, batch_size, num_steps, rng.randint(0, num_steps))
    if partition == "random":
        return random_batches(corpus, batch_size, num_steps, rng)
    raise ValueError(f"unknown partition {partition!r}; use 'sequential' or 'random'")


def num_batches(num_tokens: int, batch_size: int, num_steps: int, offset: int) -> int:
    """How many sequential minibatches an epoch with this ``offset`` has."""
    return ((num_tokens - offset - 1) // batch_size) // num_steps


def eval_streams(ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay held-out ids out as ``rows`` contiguous streams for evaluation: ``X, Y`` of shape ``(rows, L)``.

    Uses fewer rows when the text is short, so that every stream has at least one target.
    """
    rows = max(1, min(rows, (ids.numel() - 1) // 2))
    length = (ids.numel() - 1) // rows
    x = ids[: rows * length].reshape(rows, length)
    y = ids[1 : rows * length + 1].reshape(rows, length)
    return x, y
