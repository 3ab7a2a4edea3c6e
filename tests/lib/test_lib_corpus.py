"""Facts about the book's corpus that section 9.3's numbers rest on, checked on the real file and against d2l.

Without the book (a clone on its own) the same facts are checked on the generated stand-in, against figures
worked out independently of deeprnn (tests/corpora.py, ``collections.Counter``) and against d2l's own code."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from corpora import BOOK_SHA1, CorpusFile, d2l_num_chars, standin_text

from deeprnn.config import D2L_SHA1, preset_config
from deeprnn.data.batching import gather_rows, num_batches, sequential_starts, split_corpus
from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
from deeprnn.data.file_io import sha1_of
from deeprnn.data.vocab import Vocab

# The vocabulary the book prints in 8.2 (after <unk>): space, then letters by descending frequency.
BOOK_ORDER = ["<unk>", " ", *"etainoshrdlmucfwgypbvkxzjq"]


def test_the_file_is_the_books(corpus_file: CorpusFile) -> None:
    if corpus_file.is_book:
        assert sha1_of(corpus_file.path) == D2L_SHA1 == BOOK_SHA1
    else:  # the stand-in: its own digest, which the book's default never accepts
        assert sha1_of(corpus_file.path) == corpus_file.sha1 != D2L_SHA1


def test_number_of_characters(book_tokens: list[str], corpus_file: CorpusFile) -> None:
    assert len(book_tokens) == corpus_file.num_chars  # 170,580 on the book


def test_vocabulary_has_28_tokens_in_the_books_order(
    book_vocab: Vocab, book_tokens: list[str], corpus_file: CorpusFile
) -> None:
    # The book's order is the one it prints; on the stand-in, the same rule: by descending frequency.
    order = BOOK_ORDER if corpus_file.is_book else ["<unk>", *(t for t, _ in Counter(book_tokens).most_common())]
    assert len(book_vocab) == 28
    assert book_vocab.idx_to_token == order


@pytest.mark.d2l
def test_vocabulary_and_ids_equal_d2l(d2l, d2l_data_dir: Path, book_tokens: list[str], book_vocab: Vocab) -> None:
    corpus, vocab = d2l.load_corpus_time_machine()
    assert vocab.idx_to_token == book_vocab.idx_to_token
    assert book_vocab.encode(book_tokens) == corpus

    short, _ = d2l.load_corpus_time_machine(max_tokens=10000)
    cfg = preset_config("d2l-9.3").data
    ids = torch.tensor(book_vocab.encode(book_tokens))
    splits = split_corpus(ids, cfg.val_fraction, cfg.test_fraction, cfg.max_tokens)
    assert splits.train.tolist() == short  # the book's preset trains on exactly the book's 10,000 tokens
    assert splits.val.numel() == 0
    # The held-out part is the end of the book, disjoint from the training tokens.
    assert splits.test.numel() == round(len(book_tokens) * 0.1)
    assert splits.test.tolist() == corpus[-splits.test.numel() :]


def test_eight_minibatches_for_every_offset(book_tokens: list[str], book_vocab: Vocab) -> None:
    ids = torch.tensor(book_vocab.encode(book_tokens[:10000]))
    for offset in range(0, 36):
        x, y = gather_rows(ids, sequential_starts(ids.numel(), 32, 35, offset), 35)
        assert x.shape == (8, 32, 35), offset
        assert y.shape == (8, 32, 35), offset
        assert num_batches(ids.numel(), 32, 35, offset) == 8


def test_the_stand_in_is_the_same_text_every_time_book_sized_and_has_the_books_vocabulary() -> None:
    # Checked with or without the book, so the corpus a clone on its own runs on keeps what the tests assume.
    text = standin_text()
    assert text == standin_text() and 170_000 <= len(text.encode("ascii")) <= 190_000
    tokens = flatten(tokenize(preprocess_lines(text), "char"))
    assert len(tokens) == d2l_num_chars(text)
    assert sorted(Vocab(tokens).idx_to_token) == sorted(BOOK_ORDER)  # the same 28 tokens, in its own order
    assert text.startswith("The Time Machine") and "\nI\n" in text and "," in text and "'" in text
