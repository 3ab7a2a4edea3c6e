"""deeprnn.data.vocab: the book's vocabulary order, encode/decode, persistence; compared with d2l's ``Vocab``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deeprnn.data.vocab import UNK, Vocab


def test_unk_first_then_reserved_then_descending_frequency() -> None:
    vocab = Vocab(list("abbcccdddd"), reserved_tokens=["<pad>", "<bos>"])
    assert vocab.idx_to_token == [UNK, "<pad>", "<bos>", "d", "c", "b", "a"]
    assert vocab.token_to_idx == {t: i for i, t in enumerate(vocab.idx_to_token)}
    assert len(vocab) == 7
    assert vocab.unk == 0 and vocab[UNK] == 0


def test_ties_keep_first_seen_order() -> None:
    vocab = Vocab(list("zyxzyxw"))
    # z, y, x twice each (first seen in that order), then w once.
    assert vocab.idx_to_token == [UNK, "z", "y", "x", "w"]
    assert vocab.token_freqs == [("z", 2), ("y", 2), ("x", 2), ("w", 1)]


def test_min_freq_leaves_rare_tokens_out() -> None:
    vocab = Vocab(list("aaabbc"), min_freq=2)
    assert vocab.idx_to_token == [UNK, "a", "b"]
    assert vocab["c"] == 0
    assert vocab.encode(["a", "c", "b"]) == [1, 0, 2]


def test_reserved_token_in_text_is_not_duplicated() -> None:
    vocab = Vocab(["<eos>", "a", "<eos>", "<eos>"], reserved_tokens=["<eos>"])
    assert vocab.idx_to_token == [UNK, "<eos>", "a"]


def test_encode_decode_and_unknown_tokens() -> None:
    vocab = Vocab(list("hello world"))
    ids = vocab.encode(list("hello"))
    assert vocab.decode(ids) == "hello"
    assert vocab.encode(list("hq!")) == [vocab["h"], 0, 0]
    assert vocab.decode([0, vocab["o"]]) == "<unk>o"
    assert vocab.unknown(list("hqq!h")) == ["q", "!"]
    words = Vocab("the time the machine".split())
    assert words.decode(words.encode(["the", "machine"]), " ") == "the machine"


def test_empty_vocab_has_only_unk() -> None:
    vocab = Vocab()
    assert vocab.idx_to_token == [UNK]
    assert vocab.encode(["x"]) == [0]


def test_dict_and_json_round_trip(tmp_path: Path) -> None:
    vocab = Vocab(list("the time traveller \u00e9"), min_freq=1, reserved_tokens=["<pad>"])
    again = Vocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again.idx_to_token == vocab.idx_to_token
    assert again.token_to_idx == vocab.token_to_idx
    assert again.token_freqs == vocab.token_freqs

    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocab.load(path)
    assert loaded.idx_to_token == vocab.idx_to_token
    assert loaded.token_freqs == vocab.token_freqs
    assert loaded.encode(list("time?")) == vocab.encode(list("time?"))
    assert "\u00e9" in path.read_text(encoding="utf-8")  # written as UTF-8, not escaped


def test_from_dict_refuses_a_foreign_vocabulary() -> None:
    with pytest.raises(ValueError, match="index 0 must be <unk>"):
        Vocab.from_dict({"idx_to_token": ["a", "<unk>"]})
    with pytest.raises(ValueError, match="index 0 must be <unk>"):
        Vocab.from_dict({"idx_to_token": []})


@pytest.mark.d2l
@pytest.mark.parametrize("min_freq, reserved", [(0, []), (3, []), (0, ["<pad>", "<bos>"]), (2, ["<eos>"])])
def test_same_order_as_the_books_vocab(d2l, tiny_tokens: list[str], min_freq: int, reserved: list[str]) -> None:
    mine = Vocab(tiny_tokens, min_freq=min_freq, reserved_tokens=reserved)
    book = d2l.Vocab(tiny_tokens, min_freq=min_freq, reserved_tokens=list(reserved))
    assert mine.idx_to_token == book.idx_to_token
    assert mine.token_freqs == book.token_freqs
    assert mine.encode(tiny_tokens) == book[tiny_tokens]
