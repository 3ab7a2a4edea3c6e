"""Training on your own text: Chinese, German and English corpora of a few hundred KB, every character kept
(``normalize: none``), through the real training flow (embedded Prefect, sqlite MLflow), the logged model
continuing a prefix of that language, and the prepare flow finding the tokens in the cache."""

from __future__ import annotations

import random
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from flows.prepare_flow import prepare_lm
from flows.train_flow import train_lm

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
        preset="smoke", data=data, train={"device": "cpu", "epochs": 1}, sample={"prefixes": [prefix], "num_chars": 15}
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
    (continued,) = model.predict(pd.DataFrame({"prefix": [prefix]}), params={"num_chars": 15})
    assert continued.startswith(prefix) and len(continued) == len(prefix) + 15
    assert set(continued) <= set(vocab)
    assert continued == result.samples[prefix]  # greedy: the logged model repeats the run's own sample

    # The same corpus and settings again: found in the cache, not tokenized again.
    again = prepare_lm(preset="smoke", data=data)
    assert again["cache_hit"] and again["folder"] == result.tokens.folder
    assert again["vocab_size"] == len(vocab) and again["num_tokens"] == len(text)
    assert again["dtype"] == ("uint16" if language == "zh" else "uint8")
