"""deeprnn.data.batching: splits, minibatches equal to the book's iterators (D2L 8.3), evaluation streams."""

from __future__ import annotations

import random
import types

import pytest
import torch

from deeprnn.data.batching import (
    BOOK_SHUFFLE_MAX,
    CorpusTooShortError,
    EpochBatches,
    check_enough_tokens,
    eval_streams,
    gather_rows,
    min_tokens,
    num_batches,
    random_starts,
    sequential_starts,
    split_corpus,
)


@pytest.fixture(scope="module")
def corpus() -> torch.Tensor:
    # Unique values, so that any shift or reordering of positions is visible.
    return torch.randperm(10000, generator=torch.Generator().manual_seed(3))


def _epoch(
    corpus: torch.Tensor, batch_size: int, num_steps: int, partition: str, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole epoch as the trainer gets it, one minibatch at a time: ``X, Y`` of shape ``(batches, B, T)``."""
    batches = EpochBatches(corpus, batch_size, num_steps, partition, rng)
    x = torch.empty(len(batches), batch_size, num_steps, dtype=torch.long)
    y = torch.empty_like(x)
    for i in range(len(batches)):
        batches.load(i, x[i], y[i])
    return x, y


def sequential_batches(
    corpus: torch.Tensor, batch_size: int, num_steps: int, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of sequential minibatches for ``offset``: ``X, Y`` of shape ``(batches, B, T)``."""
    return gather_rows(corpus, sequential_starts(corpus.numel(), batch_size, num_steps, offset), num_steps)


class RecordingRandom(random.Random):
    """A ``random.Random`` that records the calls the batching code makes."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.calls: list[tuple] = []

    def randint(self, a: int, b: int) -> int:
        value = super().randint(a, b)
        self.calls.append(("randint", a, b, value))
        return value

    def shuffle(self, x: list) -> None:  # type: ignore[override]
        self.calls.append(("shuffle", len(x)))
        super().shuffle(x)


# ----- split_corpus ---------------------------------------------------------------------------------


def test_split_fractions() -> None:
    ids = torch.arange(1000)
    s = split_corpus(ids, val_fraction=0.1, test_fraction=0.2, max_tokens=None)
    assert torch.equal(s.train, torch.arange(0, 700))
    assert torch.equal(s.val, torch.arange(700, 800))
    assert torch.equal(s.test, torch.arange(800, 1000))


def test_split_max_tokens_cuts_training_only() -> None:
    ids = torch.arange(1000)
    s = split_corpus(ids, val_fraction=0.1, test_fraction=0.1, max_tokens=50)
    assert torch.equal(s.train, torch.arange(50))
    assert torch.equal(s.val, torch.arange(800, 900))
    assert torch.equal(s.test, torch.arange(900, 1000))
    # max_tokens larger than the training part changes nothing.
    assert split_corpus(ids, 0.0, 0.1, 10**6).train.numel() == 900


def test_split_without_validation_and_rounding() -> None:
    s = split_corpus(torch.arange(7), val_fraction=0.0, test_fraction=0.1, max_tokens=None)
    assert s.train.tolist() == [0, 1, 2, 3, 4, 5]
    assert s.val.numel() == 0
    assert s.test.tolist() == [6]


# ----- enough tokens --------------------------------------------------------------------------------


def test_check_enough_tokens_names_the_numbers() -> None:
    need = min_tokens(32, 35)
    assert need == 32 * 35 + 35 + 1
    check_enough_tokens(need, 32, 35)  # exactly enough: no error
    with pytest.raises(CorpusTooShortError) as info:
        check_enough_tokens(need - 1, 32, 35)
    msg = str(info.value)
    assert "batch_size 32" in msg and "num_steps 35" in msg
    assert str(need - 1) in msg and str(need) in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("batch_size, num_steps", [(1, 1), (2, 3), (4, 5), (32, 35)])
def test_min_tokens_gives_a_minibatch_for_every_offset(batch_size: int, num_steps: int) -> None:
    ids = torch.arange(min_tokens(batch_size, num_steps))
    for offset in range(num_steps + 1):
        assert sequential_batches(ids, batch_size, num_steps, offset)[0].shape[0] >= 1
    for seed in range(5):
        assert len(EpochBatches(ids, batch_size, num_steps, "random", random.Random(seed))) >= 1


# ----- sequential -----------------------------------------------------------------------------------


def test_sequential_rows_continue_across_minibatches(corpus: torch.Tensor) -> None:
    x, y = sequential_batches(corpus, 4, 5, 2)
    stream_len = (corpus.numel() - 2 - 1) // 4
    assert x.shape == (stream_len // 5, 4, 5)
    assert torch.equal(x[0, 0], corpus[2:7])
    assert torch.equal(x[1, 0], corpus[7:12])  # row 0 of minibatch 1 continues row 0 of minibatch 0
    assert torch.equal(x[0, 1], corpus[2 + stream_len : 2 + stream_len + 5])
    assert torch.equal(y[0, 0], corpus[3:8])  # Y is X shifted by one token


@pytest.mark.d2l
@pytest.mark.parametrize("offset", [0, 1, 7, 17, 34, 35])
def test_sequential_equals_d2l(d2l, corpus: torch.Tensor, monkeypatch: pytest.MonkeyPatch, offset: int) -> None:
    asked: list[tuple[int, int]] = []

    def randint(a: int, b: int) -> int:
        asked.append((a, b))
        return offset

    monkeypatch.setattr(d2l, "random", types.SimpleNamespace(randint=randint))
    book = list(d2l.seq_data_iter_sequential(corpus.tolist(), 32, 35))
    assert asked == [(0, 35)]
    x, y = sequential_batches(corpus, 32, 35, offset)
    assert x.shape[0] == len(book) > 0
    for i, (bx, by) in enumerate(book):
        assert torch.equal(x[i], bx), i
        assert torch.equal(y[i], by), i


def test_epoch_batches_sequential_draws_offset_in_0_to_num_steps(corpus: torch.Tensor) -> None:
    rng = RecordingRandom(5)
    x, y = _epoch(corpus, 8, 10, "sequential", rng)
    assert len(rng.calls) == 1
    name, a, b, offset = rng.calls[0]
    assert (name, a, b) == ("randint", 0, 10)
    ex, ey = sequential_batches(corpus, 8, 10, offset)
    assert torch.equal(x, ex) and torch.equal(y, ey)


def test_epoch_batches_unknown_partition(corpus: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown partition 'shuffled'"):
        EpochBatches(corpus, 8, 10, "shuffled", random.Random(0))


def test_num_batches_matches_sequential(corpus: torch.Tensor) -> None:
    for n, b, t, off in [(10000, 32, 35, 0), (10000, 32, 35, 35), (1000, 7, 9, 4), (500, 1, 500, 0)]:
        assert num_batches(n, b, t, off) == sequential_batches(corpus[:n], b, t, off)[0].shape[0]


# ----- random ---------------------------------------------------------------------------------------


@pytest.mark.d2l
@pytest.mark.parametrize("seed", [0, 1, 42, 1234])
def test_random_equals_d2l_with_the_global_random(
    d2l, corpus: torch.Tensor, restore_global_random: None, seed: int
) -> None:
    random.seed(seed)
    book = list(d2l.seq_data_iter_random(corpus.tolist(), 32, 35))
    x, y = _epoch(corpus, 32, 35, "random", random.Random(seed))
    assert x.shape == (len(book), 32, 35)
    for i, (bx, by) in enumerate(book):
        assert torch.equal(x[i], bx), i
        assert torch.equal(y[i], by), i


@pytest.mark.d2l
def test_random_makes_the_same_calls_as_d2l(d2l, corpus: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    book_rng = RecordingRandom(9)
    monkeypatch.setattr(d2l, "random", book_rng)
    list(d2l.seq_data_iter_random(corpus.tolist(), 16, 20))
    mine = RecordingRandom(9)
    EpochBatches(corpus, 16, 20, "random", mine)
    assert mine.calls == book_rng.calls
    assert [c[0] for c in mine.calls] == ["randint", "shuffle"]
    assert mine.calls[0][1:3] == (0, 19)  # the offset is drawn in [0, num_steps - 1]


def test_random_uses_each_subsequence_at_most_once(corpus: torch.Tensor) -> None:
    rng = RecordingRandom(4)
    x, y = _epoch(corpus, 8, 10, "random", rng)
    offset = rng.calls[0][3]
    starts = sorted((row[0] == corpus).nonzero().item() for row in x.reshape(-1, 10))
    assert len(set(starts)) == len(starts) == x.shape[0] * 8
    assert all((s - offset) % 10 == 0 for s in starts)
    for row_x, row_y in zip(x.reshape(-1, 10), y.reshape(-1, 10)):
        s = (row_x[0] == corpus).nonzero().item()
        assert torch.equal(row_x, corpus[s : s + 10]) and torch.equal(row_y, corpus[s + 1 : s + 11])


# ----- evaluation streams ---------------------------------------------------------------------------


def test_eval_streams_shapes_and_shift() -> None:
    ids = torch.arange(101)
    x, y = eval_streams(ids, 4)
    assert x.shape == y.shape == (4, 25)
    assert torch.equal(x.reshape(-1), torch.arange(100))
    assert torch.equal(y, x + 1)


def test_eval_streams_short_text_uses_fewer_rows() -> None:
    x, y = eval_streams(torch.arange(5), 32)
    assert x.shape == (2, 2)
    assert torch.equal(y, x + 1)
    x, y = eval_streams(torch.arange(2), 32)
    assert x.tolist() == [[0]] and y.tolist() == [[1]]


# ----- random, at scale -----------------------------------------------------------------------------


def test_random_starts_equal_the_book_minibatches(corpus: torch.Tensor) -> None:
    starts = random_starts(corpus.numel(), 8, 10, random.Random(7))
    x, y = _epoch(corpus, 8, 10, "random", random.Random(7))
    assert starts.shape == x.shape[:2] and starts.dtype == torch.int64
    for i in range(starts.shape[0]):
        for b in range(8):
            s = int(starts[i, b])
            assert torch.equal(x[i, b], corpus[s : s + 10]) and torch.equal(y[i, b], corpus[s + 1 : s + 11])


def test_large_corpora_get_a_vectorized_shuffle_without_a_python_list(monkeypatch: pytest.MonkeyPatch) -> None:
    num_tokens, b, t = 100_000_000, 32, 35  # 2.86 million subsequences: above BOOK_SHUFFLE_MAX
    assert (num_tokens - t) // t > BOOK_SHUFFLE_MAX
    rng = RecordingRandom(3)
    starts = random_starts(num_tokens, b, t, rng)
    assert [c[0] for c in rng.calls] == ["randint"]  # no random.shuffle of a list of every start
    offset = rng.calls[0][3]
    flat = starts.reshape(-1)
    assert starts.shape == ((num_tokens - offset - 1) // t // b, b)
    assert torch.all((flat - offset) % t == 0) and int(flat.min()) >= offset
    assert int(flat.max()) + t + 1 <= num_tokens  # every Y row stays inside the corpus
    assert torch.unique(flat).numel() == flat.numel()  # each subsequence at most once
    again = random_starts(num_tokens, b, t, RecordingRandom(3))
    assert torch.equal(again, starts)  # reproducible from the generator's state (so resumable)
    assert not torch.equal(random_starts(num_tokens, b, t, RecordingRandom(4))[:5], starts[:5])


def test_epoch_batches_load_one_minibatch_at_a_time_into_int64_buffers(corpus: torch.Tensor) -> None:
    small = (corpus % 200).to(torch.uint8)  # ids as a token cache stores them
    for partition in ("sequential", "random"):
        batches = EpochBatches(small, 4, 5, partition, random.Random(2))
        xs, ys = _epoch(small.long(), 4, 5, partition, random.Random(2))  # the same epoch of int64 ids
        assert len(batches) == xs.shape[0]
        x, y = torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, 5, dtype=torch.long)
        for i in (0, 1, len(batches) - 1):
            batches.load(i, x, y)
            assert torch.equal(x, xs[i].long()) and torch.equal(y, ys[i].long()), (partition, i)
