"""deeprnn.generate: greedy equals the book's ``predict_ch8``; seeded sampling; top-k; unknown prefixes; words;
batched generation equals one prefix at a time."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from deeprnn import generate as generate_module
from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
from deeprnn.data.vocab import Vocab
from deeprnn.generate import (
    MAX_REQUEST_TOKENS,
    GenerationRequestError,
    GenerationSpeed,
    GenerationTimeoutError,
    check_prefixes,
    check_work,
    generate,
    generate_batch,
    generate_ids,
    measure_speed,
    split_prefix,
)
from deeprnn.model import RNNLM

CPU = torch.device("cpu")


@pytest.fixture()
def char_tokens(book_tokens: list[str]) -> list[str]:
    """The corpus's characters (the book's, or the stand-in's)."""
    return book_tokens


@pytest.fixture()
def model(tiny_vocab: Vocab) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(len(tiny_vocab), num_hiddens=16, num_layers=2)


@pytest.mark.d2l
@pytest.mark.parametrize("prefix", ["time traveller", "traveller", "t"])
def test_greedy_equals_predict_ch8(d2l, char_tokens: list[str], prefix: str) -> None:
    book_vocab = d2l.Vocab(char_tokens)
    vocab = Vocab(char_tokens)
    assert vocab.idx_to_token == book_vocab.idx_to_token
    torch.manual_seed(0)
    book = d2l.RNNModel(nn.LSTM(len(vocab), 256, 2), len(vocab))
    with torch.no_grad():  # livelier weights than the initial ones, so the greedy text is not one repeated token
        for p in book.parameters():
            p.mul_(8.0)
    mine = RNNLM(len(vocab))
    mine.load_state_dict(book.state_dict())

    expected = d2l.predict_ch8(prefix, 50, book, book_vocab, CPU)
    got = generate(mine, vocab, prefix, 50)
    assert got == expected
    # 50 new tokens; the random weights may pick <unk> (five characters) on another corpus's vocabulary.
    assert len(got[len(prefix) :].replace("<unk>", "?")) == 50 and got.startswith(prefix)
    assert len(set(got[len(prefix) :])) > 1


def test_sampling_is_reproducible_and_seed_dependent(model: RNNLM, tiny_vocab: Vocab) -> None:
    a = generate(model, tiny_vocab, "the time", 60, temperature=1.0, seed=0)
    b = generate(model, tiny_vocab, "the time", 60, temperature=1.0, seed=0)
    c = generate(model, tiny_vocab, "the time", 60, temperature=1.0, seed=1)
    assert a == b
    assert a != c
    assert len(set(a[8:])) > 5  # an untrained model spreads its bets: sampling is not degenerate here
    assert a.startswith("the time") and len(a) == 68


def test_top_k_1_equals_greedy(model: RNNLM, tiny_vocab: Vocab) -> None:
    greedy = generate(model, tiny_vocab, "the time", 40)
    for temperature, seed in [(1.0, 0), (0.5, 3), (5.0, 7)]:
        assert generate(model, tiny_vocab, "the time", 40, temperature=temperature, top_k=1, seed=seed) == greedy


def test_top_k_samples_only_the_likeliest(tiny_vocab: Vocab) -> None:
    torch.manual_seed(0)
    model = RNNLM(len(tiny_vocab), num_hiddens=8, num_layers=1)
    favourites = ["e", "t", "a"]
    with torch.no_grad():  # logits = bias: e > t > a > every other token, whatever the input
        model.linear.weight.zero_()
        model.linear.bias.fill_(0.0)
        for rank, tok in enumerate(favourites):
            model.linear.bias[tiny_vocab[tok]] = 3.0 - rank
    top2 = generate(model, tiny_vocab, "x", 200, temperature=10.0, top_k=2, seed=0)[1:]
    assert set(top2) == {"e", "t"}
    anything = generate(model, tiny_vocab, "x", 200, temperature=10.0, seed=0)[1:]
    assert set(anything) - set(favourites)  # without top-k, high temperature reaches the other tokens


def test_bad_arguments(model: RNNLM, tiny_vocab: Vocab) -> None:
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tiny_vocab, "the", 5, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, tiny_vocab, "the", 5, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tiny_vocab, "", 5)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tiny_vocab, "   ", 5, token="word")


def test_unknown_prefix_characters_warn_and_still_generate(
    model: RNNLM, tiny_vocab: Vocab, caplog: pytest.LogCaptureFixture
) -> None:
    assert tiny_vocab.unknown(list("Time Traveller!")) == ["T", "!"]
    with caplog.at_level(logging.WARNING, logger="deeprnn.generate"):
        out = generate(model, tiny_vocab, "Time Traveller!", 10)
    assert out.startswith("Time Traveller!")  # printed back as typed
    assert len(out) == len("Time Traveller!") + 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "deeprnn.generate"]
    assert len(warnings) == 1
    assert "'T'" in warnings[0].getMessage() and "'!'" in warnings[0].getMessage()
    # Unknown characters are read as <unk>: any other unknown characters give the same continuation.
    same_ids = generate(model, tiny_vocab, "#ime #raveller%", 10)
    assert same_ids[len("Time Traveller!") :] == out[len("Time Traveller!") :]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deeprnn.generate"):
        generate(model, tiny_vocab, "time traveller", 10)
    assert not caplog.records


def test_mode_restored_and_zero_tokens(model: RNNLM, tiny_vocab: Vocab) -> None:
    model.train()
    assert generate(model, tiny_vocab, "time", 0) == "time"
    generate(model, tiny_vocab, "time", 3)
    assert model.training


def test_word_tokens(tiny_text: str) -> None:
    words = flatten(tokenize(preprocess_lines(tiny_text), "word"))
    vocab = Vocab(words)
    torch.manual_seed(0)
    model = RNNLM(len(vocab), num_hiddens=16, num_layers=1)
    assert split_prefix("the  time\ttraveller", "word") == ["the", "time", "traveller"]
    assert split_prefix("ab c", "char") == ["a", "b", " ", "c"]
    out = generate(model, vocab, "the time", 5, token="word")
    parts = out.split(" ")
    assert parts[:2] == ["the", "time"] and len(parts) == 7
    assert all(w in vocab.token_to_idx for w in parts[2:])
    sampled = generate(model, vocab, "the time", 5, token="word", temperature=1.0, seed=1)
    assert len(sampled.split(" ")) == 7
    assert generate(model, vocab, "the", 0, token="word") == "the"


# ----- batched generation ---------------------------------------------------------------------------


def _trained(vocab_size: int, ids: list[int], cell: str, steps: int = 40) -> RNNLM:
    """A tiny model trained for a few Adam steps on ``ids``: peaked, input-dependent logits, unlike random weights."""
    torch.manual_seed(0)
    model = RNNLM(vocab_size, cell=cell, num_hiddens=24, num_layers=2)
    data = torch.tensor(ids)
    span = 16
    rows = (len(data) - 1) // span
    x = data[: rows * span].reshape(rows, span)
    y = data[1 : rows * span + 1].reshape(rows, span)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        logits, _ = model(x, model.begin_state(rows, CPU))
        loss = nn.functional.cross_entropy(logits, y.T.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


CHAR_PREFIXES = ["time traveller", "t", "his grey eyes", "the", "was expounding a recondite", "t", "animated"]
WORD_PREFIXES = ["the time traveller", "his", "was expounding a", "the", "his usually pale face"]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_batched_greedy_equals_one_at_a_time_chars(cell: str, tiny_tokens: list[str], tiny_vocab: Vocab) -> None:
    model = _trained(len(tiny_vocab), tiny_vocab.encode(tiny_tokens), cell)
    one_by_one = [generate(model, tiny_vocab, p, 60) for p in CHAR_PREFIXES]
    batched = generate_batch(model, tiny_vocab, CHAR_PREFIXES, 60)
    assert batched == one_by_one
    # The rows really differ (a model that says the same thing whatever the prefix would prove nothing).
    assert len({b[len(p) :] for p, b in zip(CHAR_PREFIXES, batched)}) >= 4
    assert [len(b) for b in batched] == [len(p) + 60 for p in CHAR_PREFIXES]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_batched_greedy_equals_one_at_a_time_words(cell: str, tiny_text: str) -> None:
    words = flatten(tokenize(preprocess_lines(tiny_text), "word"))
    vocab = Vocab(words)
    model = _trained(len(vocab), vocab.encode(words), cell, steps=60)
    one_by_one = [generate(model, vocab, p, 12, token="word") for p in WORD_PREFIXES]
    batched = generate_batch(model, vocab, WORD_PREFIXES, 12, token="word")
    assert batched == one_by_one
    assert len({b[len(p) :] for p, b in zip(WORD_PREFIXES, batched)}) >= 3
    assert all(len(b.split()) == len(p.split()) + 12 for p, b in zip(WORD_PREFIXES, batched))


def test_batched_rows_do_not_depend_on_their_neighbours(tiny_tokens: list[str], tiny_vocab: Vocab) -> None:
    model = _trained(len(tiny_vocab), tiny_vocab.encode(tiny_tokens), "lstm")
    alone = generate_batch(model, tiny_vocab, ["his grey eyes"], 40)
    for company in (["t", "his grey eyes"], ["his grey eyes", "was expounding a recondite", "the"]):
        got = generate_batch(model, tiny_vocab, company, 40)
        assert got[company.index("his grey eyes")] == alone[0]


def test_batched_sampling_is_seeded_and_top_k_1_is_greedy(tiny_tokens: list[str], tiny_vocab: Vocab) -> None:
    model = _trained(len(tiny_vocab), tiny_vocab.encode(tiny_tokens), "gru")
    a = generate_batch(model, tiny_vocab, CHAR_PREFIXES, 50, temperature=1.5, seed=3)
    b = generate_batch(model, tiny_vocab, CHAR_PREFIXES, 50, temperature=1.5, seed=3)
    c = generate_batch(model, tiny_vocab, CHAR_PREFIXES, 50, temperature=1.5, seed=4)
    assert a == b and a != c
    assert a[1] != a[5]  # the same prefix twice in one batch draws its own samples
    greedy = generate_batch(model, tiny_vocab, CHAR_PREFIXES, 50)
    assert generate_batch(model, tiny_vocab, CHAR_PREFIXES, 50, temperature=2.0, top_k=1, seed=9) == greedy
    # A batch of one samples exactly what generate() samples.
    assert generate_batch(model, tiny_vocab, ["the"], 50, temperature=1.0, seed=5) == [
        generate(model, tiny_vocab, "the", 50, temperature=1.0, seed=5)
    ]


def test_batched_edge_cases(model: RNNLM, tiny_vocab: Vocab) -> None:
    assert generate_batch(model, tiny_vocab, [], 10) == []
    assert generate_batch(model, tiny_vocab, ["ab", "c"], 0) == ["ab", "c"]
    assert generate_ids(model, [[3], [4, 5]], 0) == [[], []]
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, tiny_vocab, ["the", ""], 5)
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[3], []], 5)
    with pytest.raises(ValueError, match="temperature"):
        generate_batch(model, tiny_vocab, ["the"], 5, temperature=-1.0)


def test_prefixes_are_read_by_the_corpus_rule_before_encoding(model: RNNLM, tiny_vocab: Vocab) -> None:
    typed = ["The Time-Traveller", "TRAVELLER!"]
    normalized = generate_batch(model, tiny_vocab, typed, 12, normalize="d2l")
    assert normalized == generate_batch(model, tiny_vocab, ["the time traveller", "traveller"], 12)
    assert normalized[0].startswith("the time traveller")  # not "<unk>he <unk>ime ..."
    assert check_prefixes(typed, tiny_vocab, normalize="d2l") == ["the time traveller", "traveller"]
    assert check_prefixes(typed[:1], tiny_vocab) == typed[:1]  # "none": as typed
    with pytest.raises(GenerationRequestError, match=r"prefix 0 \('#%&'\) has no character the model knows"):
        check_prefixes(["#%&"], tiny_vocab, normalize="d2l")  # nothing left once normalized


def test_a_request_above_the_work_budget_is_refused_before_any_work() -> None:
    prefixes = ["x" * 1000] * 1024
    with pytest.raises(GenerationRequestError) as info:
        check_work(prefixes, 10_000, "char")  # the heavy in-bounds request: 11,264,000 tokens of work
    assert "11,264,000 tokens of work" in str(info.value) and f"{MAX_REQUEST_TOKENS:,}" in str(info.value)
    per_row = MAX_REQUEST_TOKENS // 100
    assert check_work(["abcd"] * 100, per_row - 4, "char") == MAX_REQUEST_TOKENS  # at the budget: accepted
    with pytest.raises(GenerationRequestError):
        check_work(["abcd"] * 100, per_row - 3, "char")


def test_long_prefixes_warm_up_in_slices_with_the_same_text(
    tiny_tokens: list[str], tiny_vocab: Vocab, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _trained(len(tiny_vocab), tiny_vocab.encode(tiny_tokens), "lstm")
    prefixes = ["".join(tiny_tokens[i : i + 300]) for i in range(0, 1500, 300)]
    whole = generate_batch(model, tiny_vocab, prefixes, 40)
    monkeypatch.setattr(generate_module, "_WARM_UP_POSITIONS", 64)  # slices of 12 positions for 5 rows
    assert generate_batch(model, tiny_vocab, prefixes, 40) == whole


def test_generation_stops_at_its_deadline(model: RNNLM, tiny_vocab: Vocab) -> None:
    with pytest.raises(GenerationTimeoutError):
        generate_batch(model, tiny_vocab, ["the"], 10, deadline=time.monotonic() - 1)
    started = time.monotonic()
    with pytest.raises(GenerationTimeoutError):
        generate_batch(model, tiny_vocab, ["the"] * 64, 10_000_000, deadline=started + 0.3)
    assert time.monotonic() - started < 2.0  # stopped, not run to its end


def test_a_requests_time_is_estimated_from_the_measured_figures() -> None:
    speed = GenerationSpeed(rows=101, warm=(0.001, 0.011), greedy=(0.002, 0.102), sampled=(0.004, 0.204))
    assert speed.at(speed.greedy, 1) == 0.002 and speed.at(speed.greedy, 101) == pytest.approx(0.102)
    assert speed.at(speed.greedy, 51) == pytest.approx(0.052)  # linear in between
    assert speed.at(speed.greedy, 201) == pytest.approx(0.202)  # and beyond
    # Two prefixes of 5 tokens warm up together (4 positions at 2 rows), one of 1 token not at all; then 10
    # steps of the 3 rows.
    expected = 4 * 0.0011 + 10 * 0.004
    assert speed.seconds([5, 1, 5], 10) == pytest.approx(expected)
    assert speed.seconds([5, 1, 5], 10, sampled=True) == pytest.approx(4 * 0.0011 + 10 * 0.008)
    most = speed.tokens_within([5, 1, 5], 1.0)
    assert speed.seconds([5, 1, 5], most) <= 1.0 < speed.seconds([5, 1, 5], most + 1)
    assert speed.tokens_within([1000] * 101, 1.0) == 0  # the warm-up alone takes longer
    noisy = GenerationSpeed(rows=101, warm=(0.01, 0.001), greedy=(0.02, 0.001), sampled=(0.02, 0.001))
    assert noisy.at(noisy.greedy, 101) == 0.02  # more rows never take less than one
    # Measured again: the faster of each figure is kept.
    assert speed.faster(noisy) == GenerationSpeed(101, (0.001, 0.001), (0.002, 0.001), (0.004, 0.001))


def test_the_measured_speed_predicts_a_real_generation(tiny_vocab: Vocab) -> None:
    torch.manual_seed(0)
    model = RNNLM(len(tiny_vocab), num_hiddens=32, num_layers=2).train()
    started = time.perf_counter()
    speed = measure_speed(model, rows=64)
    assert time.perf_counter() - started < 10.0 and model.training  # short, and the model's mode is kept
    assert all(0 < s < 1.0 for pair in (speed.warm, speed.greedy, speed.sampled) for s in pair)
    encoded = [[1] * 30] * 16 + [[2] * 10] * 16
    started = time.perf_counter()
    generate_ids(model, encoded, 200)
    real = time.perf_counter() - started
    estimate = speed.seconds([len(e) for e in encoded], 200)
    # Timings on a shared machine vary; a wrong unit or a missing factor is off by far more than this.
    assert real / 20 < estimate < real * 20 + 0.1, (estimate, real, speed)
