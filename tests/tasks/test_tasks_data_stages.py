"""The data stages of deeprnn.tasks.pipeline_tasks through ``task.fn()`` (no server, no flow): download-corpus
on a real local HTTP server, prepare-tokens (the token cache built once, then found) and prepare-splits (the
split sizes of the presets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpora import CorpusFile, CountingServer

from deeprnn.config import preset_config
from deeprnn.data.batching import CorpusTooShortError
from deeprnn.data.download import DownloadError, TransientDownloadError
from deeprnn.data.prepare import PrepareError
from deeprnn.data.vocab import Vocab
from deeprnn.tasks.pipeline_tasks import download_corpus, prepare_splits, prepare_tokens


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_download_fetches_once_and_then_reads_the_cache(
    counting_server: CountingServer, corpus_file: CorpusFile, cache: Path
) -> None:
    url = counting_server.url("/timemachine.txt")
    first = download_corpus.fn(url, corpus_file.sha1)
    assert first.sha1 == corpus_file.sha1 and first.num_bytes == corpus_file.num_bytes and first.kind == "text"
    assert first.path.read_bytes() == corpus_file.path.read_bytes()
    assert cache in first.path.parents
    again = download_corpus.fn(url, corpus_file.sha1)
    assert again == first
    assert counting_server.hits == ["/timemachine.txt"]  # the second call found the hash-checked copy


def test_download_refuses_a_wrong_sha1_and_caches_nothing(
    counting_server: CountingServer, corpus_file: CorpusFile, cache: Path
) -> None:
    wrong = "0" * 40
    with pytest.raises(DownloadError, match=f"sha1 mismatch.*expected {wrong}, got {corpus_file.sha1}"):
        download_corpus.fn(counting_server.url("/timemachine.txt"), wrong)
    assert [p for p in _files(cache) if not p.endswith(".lock")] == []


def test_a_refused_connection_is_transient_and_raised_as_is_outside_a_run(refused_url: str, cache: Path) -> None:
    # Outside a task run there are no Prefect retries to count: the library's error, not "gave up after ...".
    with pytest.raises(TransientDownloadError) as info:
        download_corpus.fn(refused_url, None)
    assert "gave up" not in str(info.value) and "127.0.0.1" in str(info.value)


def test_prepare_tokens_builds_the_entry_once_and_then_finds_it(corpus_file: CorpusFile, cache: Path) -> None:
    corpus = download_corpus.fn(str(corpus_file.path), corpus_file.sha1)
    data = preset_config("d2l-9.3").data
    built = prepare_tokens.fn(corpus, data)
    assert not built.cache_hit and cache / "tokens" in built.folder.parents
    assert built.num_tokens == corpus_file.num_chars and built.vocab_size == 28 and built.dtype == "uint8"
    written = (built.folder / "ids.bin").stat().st_mtime_ns

    found = prepare_tokens.fn(corpus, data)
    assert found.cache_hit and found.folder == built.folder
    assert (found.folder / "ids.bin").stat().st_mtime_ns == written  # read, not rewritten
    assert np.array_equal(found.ids(), built.ids()) and found.vocab().idx_to_token == built.vocab().idx_to_token

    other = prepare_tokens.fn(corpus, data.model_copy(update={"normalize": "none"}))
    assert not other.cache_hit and other.folder != built.folder  # other settings, another entry
    assert other.vocab_size > 28  # capitals and punctuation kept


@pytest.mark.parametrize("preset", ["d2l-9.3", "smoke", "full-book"])
def test_prepare_splits_cuts_the_presets_sizes(corpus_file: CorpusFile, cache: Path, preset: str) -> None:
    config = preset_config(preset)
    prepared = prepare_tokens.fn(download_corpus.fn(str(corpus_file.path), corpus_file.sha1), config.data)
    splits = prepare_splits.fn(prepared, config.data, config.train)
    n = corpus_file.num_chars
    test = round(n * config.data.test_fraction)
    val = round(n * config.data.val_fraction)
    assert splits.test.numel() == test and splits.val.numel() == val
    train = n - test - val if config.data.max_tokens is None else config.data.max_tokens
    assert splits.train.numel() == train  # d2l-9.3: the book's 10,000 tokens; smoke: 2,000
    ids = prepared.ids()
    assert splits.train.tolist() == ids[:train].tolist() and splits.test.tolist() == ids[n - test :].tolist()


def test_prepare_splits_refuses_another_vocabulary_and_too_little_text(corpus_file: CorpusFile, cache: Path) -> None:
    config = preset_config("smoke")
    prepared = prepare_tokens.fn(download_corpus.fn(str(corpus_file.path), corpus_file.sha1), config.data)
    own = prepared.vocab()
    assert prepare_splits.fn(prepared, config.data, config.train, own).train.numel() == 2000
    reordered = Vocab.from_dict({**own.to_dict(), "idx_to_token": ["<unk>", *own.idx_to_token[:0:-1]]})  # other ids
    with pytest.raises(PrepareError, match="another vocabulary than the model's"):
        prepare_splits.fn(prepared, config.data, config.train, reordered)
    big = config.train.model_copy(update={"batch_size": 200})
    with pytest.raises(CorpusTooShortError, match="the training text has 2000 tokens"):
        prepare_splits.fn(prepared, config.data, big)
