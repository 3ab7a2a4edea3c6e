"""deeprnn.tasks.evaluate_tasks (evaluate-model and generate-samples) through ``task.fn()`` (no server, no
flow), on a tiny model trained for a few seconds on the corpus and saved as the flow saves it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from corpora import CorpusFile

from deeprnn.config import RunConfig, SampleConfig, preset_config
from deeprnn.data.batching import Splits
from deeprnn.data.vocab import Vocab
from deeprnn.generate import generate
from deeprnn.model import RNNLM
from deeprnn.pipeline import build_trainer, evaluate_splits, load_data
from deeprnn.tasks.evaluate_tasks import evaluate_model, generate_samples
from deeprnn.training import checkpoint


@dataclass
class Tiny:
    """A trained tiny model in memory and as a checkpoint, an untrained one of the same shape, the splits."""

    config: RunConfig
    vocab: Vocab
    model: RNNLM
    trained: Path
    untrained: Path
    splits: Splits


@pytest.fixture(scope="module")
def tiny(corpus_file: CorpusFile, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    config = preset_config(
        "smoke",
        {
            "data": {"url": str(corpus_file.path), "sha1": corpus_file.sha1, "test_fraction": 0.05},
            "model": {"num_hiddens": 16},
            "train": {"device": "cpu", "epochs": 4, "eval_every": 4, "final_eval_max_tokens": 3000},
            "sample": {"prefixes": ["time traveller", "traveller"]},  # a local copy of the book: given, not drawn
        },
    )
    data = load_data(config, cache=root / "cache")
    untrained = build_trainer(config, len(data.vocab), data.splits)
    untrained_path = checkpoint.save(
        root / "untrained.pt", checkpoint.make_payload(config, data.vocab, untrained.model, epoch=0)
    )
    trainer = build_trainer(config, len(data.vocab), data.splits)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture: set up before the per-test one-thread fixture
    try:
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    trained = checkpoint.save(root / "model.pt", checkpoint.make_payload(config, data.vocab, trainer.model, epoch=4))
    return Tiny(config, data.vocab, trainer.model.eval(), trained, untrained_path, data.splits)


def test_evaluate_model_measures_the_checkpoint_as_the_model_it_was_saved_from(tiny: Tiny) -> None:
    result = evaluate_model.fn(str(tiny.trained), tiny.splits, "cpu")
    in_memory = evaluate_splits(tiny.model, tiny.splits, tiny.config.train)
    assert result.test_perplexity == pytest.approx(in_memory.test_perplexity, rel=1e-6)
    assert result.train_perplexity_eval == pytest.approx(in_memory.train_perplexity_eval, rel=1e-6)
    # smoke has no validation split; the test split is read up to final_eval_max_tokens.
    assert result.val_perplexity is None and result.val_tokens is None
    assert result.test_tokens == min(3000, tiny.splits.test.numel()) == 3000
    assert result.metrics()["test_tokens"] == 3000


def test_a_trained_checkpoint_beats_an_untrained_one_that_guesses_about_uniformly(tiny: Tiny) -> None:
    trained = evaluate_model.fn(str(tiny.trained), tiny.splits, "cpu")
    untrained = evaluate_model.fn(str(tiny.untrained), tiny.splits, "cpu")
    # Untrained: close to a uniform guess among the 28 tokens (perplexity 28).
    assert 0.5 * len(tiny.vocab) < untrained.test_perplexity < 2 * len(tiny.vocab)
    assert math.isfinite(trained.test_perplexity) and trained.test_perplexity < 0.8 * untrained.test_perplexity
    assert trained.train_perplexity_eval < 0.8 * untrained.train_perplexity_eval


def test_generate_samples_continues_every_prefix_as_the_saved_model_does(tiny: Tiny) -> None:
    samples = generate_samples.fn(str(tiny.trained), "cpu")
    sample = tiny.config.sample
    assert list(samples) == sample.prefixes == ["time traveller", "traveller"]
    for prefix, text in samples.items():
        # One batch for all prefixes from the checkpoint = one prefix at a time from the model in memory.
        assert text == generate(tiny.model, tiny.vocab, prefix, sample.num_tokens)
        assert text.startswith(prefix) and len(text) == len(prefix) + sample.num_tokens


def test_generate_samples_takes_the_given_sample_settings_instead_of_the_checkpoints(tiny: Tiny) -> None:
    given = SampleConfig(prefixes=["the", "machine"], num_tokens=9, temperature=1.0, seed=3)
    first = generate_samples.fn(str(tiny.trained), "cpu", given)
    # Nine generated tokens each (<unk>, should sampling pick it, is one token of five characters).
    assert list(first) == ["the", "machine"] and all(
        len(t.replace("<unk>", "?")) == len(p) + 9 for p, t in first.items()
    )
    assert generate_samples.fn(str(tiny.trained), "cpu", given) == first  # seeded: the same text again
    greedy = generate_samples.fn(str(tiny.trained), "cpu", given.model_copy(update={"temperature": None}))
    assert greedy == {p: generate(tiny.model, tiny.vocab, p, 9) for p in given.prefixes}
