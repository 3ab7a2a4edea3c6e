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

Everything here works on tensors already on the training device, in whatever integer dtype they are stored
(uint8 for a small vocabulary), so an epoch's minibatches are gathers of them, never a per-step
host-to-device copy; ``EpochBatches`` hands the trainer one minibatch at a time, converted to int64.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from deeprnn.data.prepare import split_bounds


class CorpusTooShortError(ValueError):
    """The training tokens cannot fill one minibatch."""


@dataclass(frozen=True)
class Splits:
    """Token ids for training, validation (may be empty) and the held-out test part."""

    train: torch.Tensor  # (N_train,) integer ids of any dtype
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


def sequential_starts(num_tokens: int, batch_size: int, num_steps: int, offset: int) -> torch.Tensor:
    """Start positions of one epoch of the book's sequential minibatches for a given ``offset``, shape
    ``(num_batches, batch_size)``: stream ``b`` is the ``b``-th of ``batch_size`` equal parts of the corpus."""
    length = (num_tokens - offset - 1) // batch_size  # tokens per stream
    return offset + torch.arange(batch_size) * length + torch.arange(length // num_steps)[:, None] * num_steps


# Up to this many subsequences an epoch is shuffled exactly as the book does (``random.shuffle`` of a list:
# measured 1.9 s per million on a busy 2-core CPU, against 0.13 s for numpy's permutation, and small next to
# the epoch's ~30,000 minibatches); above it a Python list of every start would cost ever more seconds and
# gigabytes per epoch (28 million starts for 1e9 tokens),
# so the order comes from numpy's permutation, seeded from the same generator (reproducible and resumable,
# but not the book's order: the book never reaches this size).
BOOK_SHUFFLE_MAX = 1 << 20


def random_starts(num_tokens: int, batch_size: int, num_steps: int, rng: random.Random) -> torch.Tensor:
    """Start positions of one epoch of the book's random minibatches, shape ``(num_batches, batch_size)``.

    Draws from ``rng`` as the book does (an offset in ``[0, num_steps - 1]``, then a shuffle of the
    subsequence starts), so the minibatches equal the book's; corpora with more than ``BOOK_SHUFFLE_MAX``
    subsequences get a vectorized permutation instead (see the constant).
    """
    offset = rng.randint(0, num_steps - 1)
    num_subseqs = (num_tokens - offset - 1) // num_steps
    nb = num_subseqs // batch_size
    if num_subseqs <= BOOK_SHUFFLE_MAX:
        order = list(range(num_subseqs))
        rng.shuffle(order)
        chosen = np.asarray(order[: nb * batch_size], dtype=np.int64)
    else:
        chosen = np.random.default_rng(rng.getrandbits(64)).permutation(num_subseqs)[: nb * batch_size]
    return torch.from_numpy(chosen * num_steps + offset).reshape(nb, batch_size)


def gather_rows(
    corpus: torch.Tensor, starts: torch.Tensor, num_steps: int, steps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``X, Y`` of shape ``starts.shape + (num_steps,)``: the subsequences of ``corpus`` at ``starts`` and
    the same shifted by one token (in ``corpus``'s dtype and device). ``steps``: ``arange(num_steps)`` on
    ``corpus``'s device, when the caller keeps one."""
    if steps is None:
        steps = torch.arange(num_steps, device=corpus.device)
    pos = starts.to(corpus.device)[..., None] + steps
    return corpus[pos], corpus[pos + 1]


class EpochBatches:
    """One epoch's minibatches, loaded one at a time into the trainer's int64 ``x``/``y`` buffers.

    An epoch keeps only the start positions of its minibatches' rows and gathers each minibatch when it is
    loaded, so a large corpus is never copied whole. The copy into the buffers is where ids of a small dtype
    (uint8, uint16, int32) become int64, also for a CUDA graph that reads the buffers.
    """

    def __init__(
        self, corpus: torch.Tensor, batch_size: int, num_steps: int, partition: str, rng: random.Random
    ) -> None:
        if partition == "random":
            starts = random_starts(corpus.numel(), batch_size, num_steps, rng)
        elif partition == "sequential":  # a fresh offset in [0, num_steps] per epoch, as the book draws it
            starts = sequential_starts(corpus.numel(), batch_size, num_steps, rng.randint(0, num_steps))
        else:
            raise ValueError(f"unknown partition {partition!r}; use 'sequential' or 'random'")
        self.corpus, self.num_steps = corpus, num_steps
        self.starts = starts.to(corpus.device)
        self.steps = torch.arange(num_steps, device=corpus.device)

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def load(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Copy minibatch ``i`` into ``x`` and ``y`` (converting to their dtype and device)."""
        bx, by = gather_rows(self.corpus, self.starts[i], self.num_steps, self.steps)
        x.copy_(bx)
        y.copy_(by)


def num_batches(num_tokens: int, batch_size: int, num_steps: int, offset: int) -> int:
    """How many sequential minibatches an epoch with this ``offset`` has."""
    return ((num_tokens - offset - 1) // batch_size) // num_steps


def eval_streams(ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay held-out ids out as ``rows`` contiguous streams for evaluation: ``X, Y`` of shape ``(rows, L)``.

    Uses fewer rows when the text is short, so that every stream has at least one target.
    """
    rows = max(1, min(rows, (ids.numel() - 1) // 2))
    length = (ids.numel() - 1) // rows
    return ids[: rows * length].reshape(rows, length), ids[1 : rows * length + 1].reshape(rows, length)
