"""tasks.results without a server: what makes two models' held-out perplexities comparable (the champion)."""

from __future__ import annotations

from deeprnn.config import D2L_SHA1, DataConfig, preset_config
from tasks.results import heldout_text_key


def test_the_books_tokens_keep_the_key_earlier_champions_were_tagged_with() -> None:
    data = preset_config("d2l-9.3").data
    assert heldout_text_key(data, D2L_SHA1) == f"{D2L_SHA1}:char:val=0.0:test=0.1"


def test_other_tokens_of_the_same_text_are_not_comparable() -> None:
    book = heldout_text_key(DataConfig(), D2L_SHA1)
    keys = {
        book,
        heldout_text_key(DataConfig(normalize="none"), D2L_SHA1),
        heldout_text_key(DataConfig(normalize="lower"), D2L_SHA1),
        heldout_text_key(DataConfig(min_freq=3), D2L_SHA1),
        heldout_text_key(DataConfig(reserved_tokens=["<eos>"]), D2L_SHA1),
        heldout_text_key(DataConfig(token="word"), D2L_SHA1),
        heldout_text_key(DataConfig(test_fraction=0.2), D2L_SHA1),
        heldout_text_key(DataConfig(), "0" * 40),
    }
    assert len(keys) == 8
    assert heldout_text_key(DataConfig(max_tokens=500), D2L_SHA1) == book  # training length is not held-out text
