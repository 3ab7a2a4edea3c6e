"""Training on your own text: Chinese, German and English corpora of a few hundred KB, every character kept
(``normalize: none``), through the real training flow (embedded Prefect, sqlite MLflow), the logged model
continuing a prefix of that language, and the prepare flow finding the tokens in the cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from deeprnn.flows.prepare_flow import prepare_lm
from deeprnn.flows.train_flow import train_lm

pytestmark = pytest.mark.e2e

CHINESE = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天"
    "而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些"
) + "".join(chr(0x4E00 + 7 * i) for i in range(300))  # and more of the CJK block: a vocabulary above 256 (uint16 ids)
GERMAN = (
    "Über die Brücke gingen die Mädchen und Jungen der Stadt . Die Straße war schön , größer als früher ; "
    "Käse , Öl und Brötchen lagen auf dem Tisch . Wir fahren über Österreich nach Süden , sagte er . "
    "Es ist nicht weit , nur dreißig Minuten zu Fuß !"
).split()
ENGLISH = (
    "The Time Traveller (for so it will be convenient to speak of him) was expounding a recondite matter to us . "
    "His grey eyes shone and twinkled , and his usually pale face was flushed and animated . In 1895 , 42 of us "
    'met at 8 o\'clock ; "Clearly ," said he , "any real body must have extension in FOUR directions !"'
).split()


def _text(language: str, size: int, seed: int = 0) -> str:
    """A few hundred KB of text in ``language``, with line breaks, built from its own characters or words."""
    rng = random.Random(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        if language == "zh":
            line = "".join(rng.choice(CHINESE) for _ in range(rng.randint(8, 30))) + rng.choice("，。！？") + "\n"
        else:
            words = GERMAN if language == "de" else ENGLISH
            line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "\n"
        parts.append(line)
        length += len(line.encode("utf-8"))
    return "".join(parts)


PREFIXES = {"zh": "时的人", "de": "Über die Brücke", "en": "The Time Traveller"}


@pytest.mark.parametrize("language", ["zh", "de", "en"])
def test_own_text_keeps_every_character_trains_and_continues_a_prefix(workdir: Path, language: str) -> None:
    text = _text(language, 300_000)
    corpus = workdir / f"{language}.txt"
    corpus.write_text(text, encoding="utf-8", newline="")
    data = {"url": str(corpus), "normalize": "none", "max_tokens": 4000}
    prefix = PREFIXES[language]

    result = train_lm(
        preset="smoke", data=data, train={"device": "cpu", "epochs": 1}, sample={"prefixes": [prefix], "num_tokens": 15}
    )

    run_id = result.run_id
    vocab = mlflow.artifacts.load_dict(f"runs:/{run_id}/vocab.json")["idx_to_token"]
    assert set(text) <= set(vocab)  # umlauts, CJK, digits, punctuation, capitals and the newline all kept
    assert len(vocab) == len(set(text)) + 1  # and nothing else but <unk>
    assert not result.tokens.cache_hit and result.tokens.num_tokens == len(text)
    run = mlflow.get_run(run_id)
    assert run.data.params["data.normalize"] == "none"
    # Named after what ran: preset, the file's stem (its SHA-1 prefix once the corpus is read), model.
    assert run.data.tags["prefect.flow_run_name"] == f"smoke\u00b7{language}\u00b7lstm2x32"
    assert run.info.run_name.startswith(f"smoke\u00b7{language}") and run.info.run_name.endswith("\u00b7lstm2x32")

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    (continued,) = model.predict(pd.DataFrame({"prefix": [prefix]}), params={"num_tokens": 15})
    assert continued.startswith(prefix) and len(continued) == len(prefix) + 15
    assert set(continued) <= set(vocab)
    assert continued == result.samples[prefix]  # greedy: the logged model repeats the run's own sample

    # The same corpus and settings again: found in the cache, not tokenized again.
    again = prepare_lm(preset="smoke", data=data)
    assert again["cache_hit"] and again["folder"] == result.tokens.folder
    assert again["vocab_size"] == len(vocab) and again["num_tokens"] == len(text)
    assert again["dtype"] == ("uint16" if language == "zh" else "uint8")


# ----- your own text in one command: the text preset ---------------------------------------------------

LICENSES = Path("/usr/share/common-licenses")  # real English prose every Debian system ships (base-files)


def _real_text(workdir: Path) -> Path:
    """The license texts a Debian system ships, in one file: real text, not generated."""
    files = sorted(p for p in LICENSES.glob("*") if p.is_file() and not p.is_symlink()) if LICENSES.is_dir() else []
    if not files:
        pytest.skip(f"no license texts in {LICENSES} to use as real text")
    path = workdir / "licenses.txt"
    path.write_bytes(b"".join(p.read_bytes() for p in files))
    return path


@pytest.mark.parametrize("kind", ["generated", "real"])
def test_the_text_preset_sizes_to_the_text_ends_on_time_and_samples_from_the_held_out_text(
    workdir: Path, kind: str
) -> None:
    corpus = workdir / "faust.txt"
    if kind == "generated":
        corpus.write_text(_text("de", 200_000, seed=5), encoding="utf-8", newline="")
    else:
        corpus = _real_text(workdir)
    text = corpus.read_text(encoding="utf-8")
    budget = 6.0

    result = train_lm(data={"url": str(corpus)}, train={"device": "cpu", "time_budget": f"{budget:g}s"})

    run = mlflow.get_run(result.run_id)
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["preset"] == "text" and params["data.normalize"] == "none" and params["model.size"] == "fixed"
    assert int(params["model.num_hiddens"]) in (128, 192, 256, 384, 512, 768, 1024)
    # No CPU plans 4,000 steps of 32 rows in 6 s: the rows are halved (to 8 unless a probe is disturbed), once.
    assert params["train.batch_size"] in ("8", "16") and params["train.min_planned_steps"] == "0"
    assert params["train.lr_schedule"] == "warmup-stable-decay" and params["data.max_tokens"] == ""  # the whole text
    # Every character kept, and the splits: 85% training, 5% validation (picks the weights), 10% test at the end.
    assert len(mlflow.artifacts.load_dict(f"runs:/{result.run_id}/vocab.json")["idx_to_token"]) == len(set(text)) + 1
    assert result.evaluation.val_tokens == pytest.approx(0.05 * len(text), abs=2)
    assert result.evaluation.test_tokens == pytest.approx(0.1 * len(text), abs=2)
    # Ended by the budget, on time, with the best validation weights.
    assert tags["deeprnn.stop_reason"] in ("time_budget", "early_stopping")
    assert budget * 0.8 <= metrics["train_seconds"] <= budget + 5  # "within 5% or 5 s"
    assert metrics["best_heldout_perplexity"] == pytest.approx(result.evaluation.val_perplexity, rel=1e-4)
    # Samples continue prefixes drawn from the starts of held-out lines.
    prefixes = json.loads(params["sample.prefixes"])
    heldout = text[int(0.9 * len(text)) :]
    assert len(prefixes) == 3 and list(result.samples) == prefixes
    assert all(("\n" + p) in heldout and "time traveller" not in p for p in prefixes)


def test_a_plateau_stops_early_and_mlflow_says_when_and_why(workdir: Path) -> None:
    corpus = workdir / "plateau.txt"
    corpus.write_text(_text("en", 100_000, seed=2), encoding="utf-8", newline="")
    # A learning rate too small to change anything: validation perplexity stays where it started.
    train = {"device": "cpu", "time_budget": None, "epochs": 40, "lr": 1e-12, "warmup_steps": 0}
    train |= {"evaluations": None, "eval_every": 1, "patience": 2}
    result = train_lm(data={"url": str(corpus)}, model={"num_hiddens": 16}, train=train)

    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["deeprnn.stop_reason"] == "early_stopping"
    detail = run.data.tags["deeprnn.stop_detail"]
    assert "evaluation 3" in detail and "for 2 evaluations in a row" in detail
    assert run.data.metrics["evaluations"] == 3 and result.training.epochs_done == 3
    assert int(run.data.tags["deeprnn.stopped_at_step"]) == result.training.steps_done
