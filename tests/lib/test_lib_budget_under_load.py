"""A time budget holds, evaluations included, when the machine slows down mid-run (a real busy process on the
same core) and at a vocabulary of 65,536 characters, where the size rule keeps the steps cheap and the run
reaches its samples."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from typing import Any, Iterator

import pytest
import torch

from deeprnn.config import preset_config
from deeprnn.data.batching import split_corpus
from deeprnn.data.vocab import Vocab
from deeprnn.evaluate import LOGIT_FLOATS, perplexity, perplexity_until
from deeprnn.generate import generate_batch
from deeprnn.model import RNNLM
from deeprnn.pipeline import build_trainer, evaluate_splits
from deeprnn.sizing import size_to_text, within_logits
from deeprnn.training.loop import Trainer
from deeprnn.training.progress import StepStats

CPU = torch.device("cpu")
pinnable = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")


@pytest.fixture
def one_core() -> Iterator[int]:
    """This process and torch pinned to one core (restored afterwards); yields the core."""
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    core = min(before)
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)


def _busy_loop(core: int) -> subprocess.Popen[bytes]:
    """A process spinning on ``core``: it takes about half of that core from this one."""
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _lines(seed: int, count: int) -> str:
    rng = random.Random(seed)
    words = "Habe nun ach Philosophie Juristerei und Medizin auch leider Theologie durchaus studiert".split()
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) + "\n" for _ in range(count))


@pinnable
def test_a_time_budget_holds_when_another_process_takes_half_the_cpu_mid_run(one_core: int) -> None:
    text = _lines(5, 30_000)
    vocab = Vocab(list(text))
    ids = torch.tensor(vocab.encode(list(text)), dtype=torch.uint8)
    budget = 10.0
    # A large held-out split read whole: the last evaluation is a tenth of the budget on a calm core, and
    # twice that once the competing process runs.
    train = {"device": "cpu", "time_budget": budget, "evaluations": 4, "patience": None, "eval_max_tokens": None}
    model = {"num_hiddens": 64, "embedding_dim": 16}
    cfg = preset_config("text", {"data": {"val_fraction": 0.3}, "model": model, "train": train})
    splits = split_corpus(ids, cfg.data.val_fraction, cfg.data.test_fraction, None)
    torch.manual_seed(0)
    trainer = Trainer(RNNLM.from_config(len(vocab), cfg.model), splits.train, cfg.train, CPU, heldout_ids=splits.val)
    busy: list[subprocess.Popen[bytes]] = []

    def on_step(stats: StepStats) -> None:
        if not busy and time.perf_counter() - started > 0.4 * budget:
            busy.append(_busy_loop(one_core))

    started = time.perf_counter()
    try:
        result = trainer.fit(on_step=on_step)
        elapsed = time.perf_counter() - started
        assert busy and busy[0].poll() is None, "the competing process did not run to the end"
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert result.stop_reason == "time_budget" and result.evaluations >= 1
    assert budget * 0.85 <= elapsed <= budget * 1.05, elapsed  # evaluations included


def _many_characters(distinct: int, length: int, seed: int = 0) -> str:
    """A text of ``distinct`` characters (each at least once; CJK and the planes above), words and lines."""
    points = (c for c in range(0x4E00, 0x4E00 + distinct + 4096) if not 0xD800 <= c <= 0xDFFF)
    chars = [chr(c) for c, _ in zip(points, range(distinct - 3))]  # and the space, the line break, <unk>
    rng = random.Random(seed)
    common = chars[: len(chars) // 50]
    body = chars + [rng.choice(common) if rng.random() < 0.7 else rng.choice(chars) for _ in range(length)]
    words = ["".join(body[i : i + 6]) for i in range(0, len(body), 6)]
    return "".join(" ".join(words[i : i + 6]) + "\n" for i in range(0, len(words), 6))


def test_the_step_logits_stay_bounded_at_any_vocabulary() -> None:
    assert within_logits(32, 64, 100) == (32, 64)  # a small vocabulary keeps its batch
    assert within_logits(32, 64, 8192) == (32, 64)
    for vocab_size in (10_000, 49_000, 65_536, 200_000):
        rows, steps = within_logits(32, 64, vocab_size)
        assert rows * steps * vocab_size <= LOGIT_FLOATS or (rows, steps) == (8, 8)
        assert rows >= 8 and steps >= 8


@pytest.mark.parametrize("vocab_size", [100, 8192, 49_000, 65_536])
def test_only_a_large_vocabulary_shortens_the_batch_and_caps_the_evaluations(
    vocab_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deeprnn import sizing

    monkeypatch.setattr(sizing, "measure_throughput", lambda *args, **kwargs: 2_000.0)  # as slow as it gets
    config = preset_config("text", {"train": {"time_budget": "15s"}})
    _, train, note = sizing.size_model(config, 2_000_000, vocab_size, CPU)
    if vocab_size <= 8192:  # the preset's evaluations, and its batch but for the rows a short budget halves
        assert train["num_steps"] == 64 and "eval_max_tokens" not in train and "capped" not in note
    else:
        assert train["batch_size"] == 8 and train["num_steps"] == 32
        # One evaluation about a tenth of the budget, each final split about a twentieth, at twice the speed.
        assert train["eval_max_tokens"] == 6_000 and train["final_eval_max_tokens"] == 3_000
        assert "held-out evaluations capped to what the budget affords" in note


def test_an_evaluation_stops_reading_at_its_deadline() -> None:
    torch.manual_seed(0)
    model = RNNLM(20_000, "lstm", 32, 1, 0.0, 16)
    ids = torch.randint(0, 20_000, (4_000,))
    whole, count = perplexity_until(model, ids, None, rows=8)
    assert count == 3_992 and whole == perplexity(model, ids, rows=8)  # pieces of 104 steps at this vocabulary
    started = time.perf_counter()
    value, read = perplexity_until(model, ids, started, rows=8)  # already past: one piece only
    assert read == 8 * 104 and value > 0 and time.perf_counter() - started < 1.0


def test_a_vocabulary_of_65536_characters_keeps_its_budget_and_reaches_its_samples() -> None:
    text = _many_characters(65_536, 250_000)
    vocab = Vocab(list(text))
    assert len(vocab) == 65_536
    ids = torch.tensor(vocab.encode(list(text)), dtype=torch.int32)
    budget = 8.0
    config = preset_config("text", {"data": {"url": "many.txt"}, "train": {"time_budget": budget, "device": "cpu"}})
    sized = size_to_text(config, ids, vocab, CPU)
    train = sized.config.train
    assert train.batch_size * train.num_steps * len(vocab) <= LOGIT_FLOATS
    assert train.eval_max_tokens is not None and train.eval_max_tokens < 40_000  # what the budget affords
    assert train.final_eval_max_tokens is not None
    splits = split_corpus(ids, sized.config.data.val_fraction, sized.config.data.test_fraction, None)
    trainer = build_trainer(sized.config, len(vocab), splits, CPU)
    started = time.perf_counter()
    result = trainer.fit()
    elapsed = time.perf_counter() - started
    assert result.stop_reason == "time_budget" and result.evaluations >= 1
    # A step here takes a tenth of the budget or more: ending a step early is a larger share than above.
    assert budget * 0.7 <= elapsed <= budget * 1.05, elapsed
    assert result.steps_done >= 2
    started = time.perf_counter()
    evaluation = evaluate_splits(trainer.model, splits, train)
    sample: dict[str, Any] = {"temperature": 0.8, "top_k": 20}
    texts = generate_batch(trainer.model, vocab, sized.config.sample.prefixes, 20, **sample)
    assert evaluation.test_tokens == train.final_eval_max_tokens and all(len(t) > 20 for t in texts)
    assert time.perf_counter() - started < 2 * budget  # to the samples in time
