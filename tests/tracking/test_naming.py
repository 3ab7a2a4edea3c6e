"""Run and experiment names that say what ran: preset, corpus (file stem and SHA-1 prefix) and model shape."""

from __future__ import annotations

from deeprnn.config import D2L_SHA1, D2L_URL, preset_config, resolve
from deeprnn.tracking import naming

FAUST_SHA1 = "1f3a9c2e" + "0" * 32


def test_a_run_of_an_own_text_is_named_by_preset_corpus_and_model() -> None:
    config = resolve("smoke", model={"num_layers": 2, "num_hiddens": 256})
    stem = naming.corpus_stem("/home/me/texts/Faust.txt")
    assert naming.run_name(config, stem, FAUST_SHA1) == "smoke\u00b7faust-1f3a9c2e\u00b7lstm2x256"


def test_a_model_still_to_be_sized_states_no_width_until_it_is_sized() -> None:
    config = preset_config("text")  # model.size "auto", the preset's 256 only a starting point
    assert naming.run_name(config, "faust", FAUST_SHA1) == "text\u00b7faust-1f3a9c2e\u00b7lstm2xauto"
    sized = resolve("text", model={"size": "fixed", "num_hiddens": 128})
    assert naming.run_name(sized, "faust", FAUST_SHA1) == "text\u00b7faust-1f3a9c2e\u00b7lstm2x128"


def test_a_run_of_the_book_says_so_and_its_experiment_stays_deeprnn_train() -> None:
    config = preset_config("d2l-9.3")
    stem = naming.corpus_stem(D2L_URL)
    assert naming.run_name(config, stem, D2L_SHA1) == "d2l-9.3\u00b7timemachine-090b5e7e\u00b7lstm2x256"
    assert naming.experiment_name(stem, D2L_SHA1) == "deeprnn-train"


def test_another_text_gets_an_experiment_of_its_own_per_version() -> None:
    assert naming.experiment_name("faust", FAUST_SHA1) == "deeprnn-faust-1f3a9c2e"
    assert naming.experiment_name("faust", "2" * 40) == "deeprnn-faust-22222222"


def test_corpus_stems_are_slugs_of_the_file_name_whatever_the_url() -> None:
    assert naming.corpus_stem("file:///srv/Goethe%20Faust%20I.txt") == "goethe-faust-i"
    assert naming.corpus_stem("https://user:pw@example.org/a/b/Les_Mis\u00e9rables.txt?x=1") == "les-mis-rables"
    assert naming.corpus_stem("/data/corpus/") == "corpus"
    assert naming.corpus_stem("/data/\u4e2d\u6587.txt") == "corpus"  # nothing left of a non-Latin name
    assert naming.corpus_label("faust", None) == "faust"  # before the SHA-1 is known (the flow run's name)
