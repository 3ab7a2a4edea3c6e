"""deeprnn.data.prepare: the prepared token cache (tokenize once, memory-mappable ids, vocabulary beside them)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from corpora import CorpusFile

from deeprnn.config import DataConfig, preset_config
from deeprnn.data import prepare as prep
from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
from deeprnn.data.download import fetch_corpus
from deeprnn.data.prepare import PrepareError, dropped_letters_warning, id_dtype, split_sizes
from deeprnn.data.vocab import Vocab


def _corpus(tmp_path: Path, text: str, name: str = "corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return fetch_corpus(str(path))


def _data(**fields) -> DataConfig:
    return DataConfig(**fields)


def test_book_ids_and_vocabulary_equal_the_books_preprocessing(corpus_file: CorpusFile, tmp_path: Path) -> None:
    book_path = corpus_file.path
    tokens = flatten(tokenize(preprocess_lines(book_path.read_text(encoding="utf-8")), "char"))
    book_vocab = Vocab(tokens)
    prepared = prep.prepare(fetch_corpus(str(book_path)), preset_config("d2l-9.3").data, tmp_path)
    assert prepared.vocab().idx_to_token == book_vocab.idx_to_token and prepared.vocab_size == 28
    assert prepared.dtype == "uint8" and prepared.num_tokens == corpus_file.num_chars
    assert np.array_equal(prepared.ids(), np.array(book_vocab.encode(tokens)))
    assert prepared.dropped_share == 0.0 and dropped_letters_warning(prepared) is None


def test_normalize_none_keeps_every_character_exactly(tmp_path: Path) -> None:
    text = "Über die Brücke gingen die Mädchen.\r\n时间机器，是一部小说。\n\tTabs, DIGITS 123!\n"
    prepared = prep.prepare(_corpus(tmp_path, text), _data(normalize="none"), tmp_path)
    vocab = prepared.vocab()
    assert vocab.decode(prepared.ids().tolist()) == text  # nothing lost: case, punctuation, CR LF, CJK
    assert set(text) <= set(vocab.idx_to_token)


def test_small_chunks_give_the_same_entry_as_one_chunk(tmp_path: Path) -> None:
    rng = random.Random(0)
    text = "".join(rng.choice("ab Cd\n,é时\r") for _ in range(5000))
    corpus = _corpus(tmp_path, text)
    for mode in ("d2l", "none", "lower"):
        whole = prep.prepare(corpus, _data(normalize=mode), tmp_path / "one")
        # chunks cut through lines and multi-byte characters
        small = prep.prepare(corpus, _data(normalize=mode), tmp_path / "many", chunk_bytes=7)
        assert small.vocab().idx_to_token == whole.vocab().idx_to_token, mode
        assert np.array_equal(small.ids(), whole.ids()), mode


def test_second_call_is_a_cache_hit_and_other_settings_get_other_entries(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, "The Time Machine\nby H. G. Wells\n" * 50)
    first = prep.prepare(corpus, _data(), tmp_path)
    again = prep.prepare(corpus, _data(val_fraction=0.1, max_tokens=None), tmp_path)  # splits are not tokenization
    assert not first.cache_hit and again.cache_hit and again.folder == first.folder
    others = [
        prep.prepare(corpus, _data(normalize="none"), tmp_path),
        prep.prepare(corpus, _data(token="word"), tmp_path),
        prep.prepare(corpus, _data(min_freq=60), tmp_path),
        prep.prepare(corpus, _data(reserved_tokens=["<eos>"]), tmp_path),
    ]
    assert len({first.folder, *(p.folder for p in others)}) == 5 and not any(p.cache_hit for p in others)
    meta = json.loads((first.folder / "meta.json").read_text())
    assert meta["corpus_sha1"] == corpus.sha1 and meta["settings"]["normalize"] == "d2l"


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "bad meta", "no vocab"])
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    corpus = _corpus(tmp_path, "abc def ghi\n" * 100)
    good = prep.prepare(corpus, _data(), tmp_path)
    expected = good.ids().copy()
    if damage == "flip a byte":
        raw = bytearray((good.folder / "ids.bin").read_bytes())
        raw[5] ^= 0x01
        (good.folder / "ids.bin").write_bytes(bytes(raw))
    elif damage == "truncate":
        (good.folder / "ids.bin").write_bytes((good.folder / "ids.bin").read_bytes()[:-3])
    elif damage == "bad meta":
        (good.folder / "meta.json").write_text("{not json")
    else:
        (good.folder / "vocab.json").unlink()
    with caplog.at_level("WARNING", logger="deeprnn.data.token_cache"):
        rebuilt = prep.prepare(corpus, _data(), tmp_path)
    assert not rebuilt.cache_hit and np.array_equal(rebuilt.ids(), expected)
    assert "is damaged" in caplog.text and "preparing it again" in caplog.text
    assert prep.prepare(corpus, _data(), tmp_path).cache_hit


def test_ids_use_the_smallest_unsigned_type(tmp_path: Path) -> None:
    assert id_dtype(256) == np.uint8 and id_dtype(257) == np.uint16
    assert id_dtype(65_536) == np.uint16 and id_dtype(65_537) == np.uint32
    words = " ".join(f"w{i}" for i in range(300)) + "\n"
    prepared = prep.prepare(_corpus(tmp_path, words), _data(token="word", normalize="none"), tmp_path)
    assert prepared.vocab_size == 301 and prepared.dtype == "uint16"
    assert prepared.vocab().decode(prepared.ids().tolist(), " ") == words.strip()


def test_a_text_that_normalizes_to_nothing_is_refused(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, "时间机器，是一部小说。\n12345 !!!\n")
    with pytest.raises(PrepareError, match=r"normalizes to nothing with --normalize d2l.*--normalize none"):
        prep.prepare(corpus, _data(), tmp_path)
    assert prep.prepare(corpus, _data(normalize="none"), tmp_path).num_tokens > 0


def test_a_text_losing_many_letters_gets_a_warning_naming_the_share(tmp_path: Path) -> None:
    prepared = prep.prepare(_corpus(tmp_path, "Über die Brücke gingen die Mädchen\n"), _data(), tmp_path)
    warning = dropped_letters_warning(prepared)
    assert warning is not None and "10.3%" in warning and "--normalize none" in warning  # 3 of 29 letters
    assert prep.prepare(prepared_corpus := _corpus(tmp_path, "plain english\n", "en.txt"), _data(), tmp_path)
    assert dropped_letters_warning(prep.prepare(prepared_corpus, _data(), tmp_path)) is None


def test_a_word_vocabulary_too_large_for_memory_is_refused_naming_min_freq(tmp_path: Path) -> None:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[(i // 26**k) % 26] for k in range(4)) for i in range(prep.MAX_VOCAB + 10)]
    corpus = _corpus(tmp_path, " ".join(words + words[:1000] * 2) + "\n")  # 1,000 words occur 3 times
    with pytest.raises(
        PrepareError, match=r"250,011 tokens with min_freq 0.*raise --min-freq \(--min-freq 2 gives 1,001"
    ):
        prep.prepare(corpus, _data(token="word"), tmp_path)
    assert not any((tmp_path / "tokens").glob("[0-9a-f]*[0-9a-f]"))  # nothing half-written is left behind


def test_split_sizes_match_the_splits_the_training_uses(tmp_path: Path) -> None:
    import torch

    from deeprnn.data.batching import split_corpus

    prepared = prep.prepare(_corpus(tmp_path, "abcdefghij klmnop\n" * 300), _data(), tmp_path)
    for data in (_data(), _data(val_fraction=0.1, test_fraction=0.2, max_tokens=None), _data(max_tokens=50)):
        splits = split_corpus(torch.from_numpy(prepared.ids()), data.val_fraction, data.test_fraction, data.max_tokens)
        assert split_sizes(prepared, data) == {
            "train": splits.train.numel(),
            "validation": splits.val.numel(),
            "test": splits.test.numel(),
        }
        assert splits.train.dtype == torch.uint8  # the cache's type travels into the splits, nothing is widened


def test_max_tokens_zero_trains_on_the_whole_training_split(tmp_path: Path) -> None:
    prepared = prep.prepare(_corpus(tmp_path, "abcdefghij klmnop\n" * 1000), _data(), tmp_path)
    whole = split_sizes(prepared, _data(max_tokens=0))
    assert whole == split_sizes(prepared, _data(max_tokens=None))
    assert whole["train"] == prepared.num_tokens - whole["test"] > 10_000 == split_sizes(prepared, _data())["train"]


def test_a_byte_order_mark_is_never_a_token(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfThe Time Machine\n")
    corpus = fetch_corpus(str(path))
    chars = prep.prepare(corpus, _data(normalize="none"), tmp_path)
    assert chars.vocab().decode(chars.ids().tolist()) == "The Time Machine\n"
    words = prep.prepare(corpus, _data(normalize="none", token="word"), tmp_path)
    assert words.vocab().decode(words.ids().tolist(), " ") == "The Time Machine"
    assert "\ufeff" not in "".join(chars.vocab().idx_to_token + words.vocab().idx_to_token)
