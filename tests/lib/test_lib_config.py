"""deeprnn.config: the book's defaults, presets, bounds, overrides and the schema Prefect's form is built from."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import ValidationError

from deeprnn.config import (
    D2L_SHA1,
    D2L_URL,
    PRESETS,
    DataConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    preset_config,
    resolve,
    section_values,
)


def test_defaults_are_the_books() -> None:
    cfg = RunConfig()
    assert cfg.preset == "d2l-9.3"
    assert (cfg.train.batch_size, cfg.train.num_steps) == (32, 35)
    assert (cfg.model.cell, cfg.model.num_hiddens, cfg.model.num_layers) == ("lstm", 256, 2)
    assert cfg.model.dropout == 0.0 and cfg.model.embedding_dim is None
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.clip_norm) == ("sgd", 2.0, 1.0)
    assert cfg.train.epochs == 500
    assert cfg.train.partition == "sequential"
    assert cfg.train.lr_schedule == "constant" and cfg.train.weight_decay == 0.0
    assert cfg.data.max_tokens == 10000
    assert (cfg.data.url, cfg.data.token, cfg.data.min_freq) == (D2L_URL, "char", 0)
    assert cfg.sample.prefixes == ["time traveller", "traveller"] and cfg.sample.num_tokens == 50
    assert cfg.sample.temperature is None  # greedy, as the book
    assert preset_config("d2l-9.3") == cfg


def test_presets_resolve() -> None:
    assert PRESETS == ("d2l-9.3", "full-book", "smoke", "text")
    for name in PRESETS:
        assert preset_config(name).preset == name
    full = preset_config("full-book")
    assert full.data.max_tokens is None and full.data.val_fraction == 0.1
    assert (full.model.num_layers, full.model.num_hiddens, full.model.dropout, full.model.embedding_dim) == (
        3,
        512,
        0.5,
        64,
    )
    assert (full.train.optimizer, full.train.lr_schedule) == ("adamw", "cosine")
    smoke = preset_config("smoke")
    assert smoke.model.num_hiddens == 32 and smoke.train.epochs == 3 and smoke.data.max_tokens == 2000
    assert smoke.model.num_layers == 2  # untouched fields keep the book's value


def test_preset_overrides_merge_deeply() -> None:
    cfg = preset_config("smoke", {"model": {"num_layers": 1}, "train": {"epochs": 7}})
    assert cfg.model.num_layers == 1 and cfg.model.num_hiddens == 32  # merged, not replaced
    assert cfg.train.epochs == 7 and cfg.train.batch_size == 8
    assert preset_config("smoke").model.num_layers == 2  # presets are not mutated by overrides


def test_unknown_preset_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        preset_config("d2l-9.4")
    msg = str(info.value)
    assert "'d2l-9.4'" in msg
    assert all(name in msg for name in PRESETS)
    with pytest.raises(ValueError, match="full-book"):
        resolve("nope")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"model": {"num_layers": 0}}, "model.num_layers"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"clip_norm": 0}}, "train.clip_norm"),
        ({"data": {"sha1": "not-a-hash"}}, "data.sha1"),
        ({"data": {"sha1": "0" * 39}}, "data.sha1"),
        ({"data": {"test_fraction": 0}}, "data.test_fraction"),
        ({"model": {"cell": "transformer"}}, "model.cell"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
        ({"train": {"batch": 32}}, "train.batch"),  # unknown keys are errors, not silently ignored
    ],
)
def test_out_of_range_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        preset_config("d2l-9.3", overrides)
    assert field in str(info.value)


def test_splits_must_leave_training_text() -> None:
    with pytest.raises(ValidationError, match="at least 10% of the corpus"):
        DataConfig(val_fraction=0.5, test_fraction=0.4)
    DataConfig(val_fraction=0.4, test_fraction=0.4)


def test_each_sample_prefix_must_not_be_empty_and_no_prefix_means_drawn_from_the_text() -> None:
    with pytest.raises(ValidationError, match="prefixes"):
        SampleConfig(prefixes=["time", ""])
    assert SampleConfig(prefixes=[]).prefixes == []  # drawn from the held-out text (deeprnn.sizing)


def test_assignment_is_validated() -> None:
    cfg = RunConfig()
    with pytest.raises(ValidationError, match="lr"):
        cfg.train.lr = 0.0
    assert cfg.train.lr == 2.0


def test_expected_sha1() -> None:
    assert DataConfig().expected_sha1() == D2L_SHA1
    assert DataConfig(url="https://example.com/other.txt").expected_sha1() is None
    assert DataConfig(url="https://example.com/x", sha1="A" * 40).expected_sha1() == "a" * 40
    assert DataConfig(sha1=D2L_SHA1.upper()).expected_sha1() == D2L_SHA1
    for wrong in ("g" * 40, "a" * 41):
        with pytest.raises(ValidationError, match="sha1"):
            DataConfig(sha1=wrong)


def test_resolve_takes_the_fields_each_section_sets_and_the_presets_for_the_rest() -> None:
    cfg = resolve(
        "smoke",
        data=DataConfig.model_validate({"max_tokens": 500}),
        model=ModelConfig(num_layers=3),
        train={"epochs": 2},
        sample=None,
    )
    assert cfg.preset == "smoke"
    assert cfg.data.max_tokens == 500 and cfg.data.test_fraction == 0.1
    smoke = preset_config("smoke")
    assert cfg.model.num_layers == 3 and cfg.model.num_hiddens == smoke.model.num_hiddens == 32  # the preset's
    assert cfg.train.epochs == 2 and cfg.train.lr == 1.0 and cfg.train.batch_size == 8
    assert cfg.sample == smoke.sample
    assert resolve("d2l-9.3") == RunConfig()
    # An explicit None is a value (the whole training split), not "keep the preset's".
    assert resolve("d2l-9.3", data={"max_tokens": None}).data.max_tokens is None
    assert resolve("d2l-9.3", data=DataConfig(max_tokens=None)).data.max_tokens is None
    with pytest.raises(ValidationError, match="num_layers"):
        resolve("d2l-9.3", model={"num_layers": 17})


def test_a_complete_section_replaces_the_presets_whole() -> None:
    # What the dashboard's form sends: every field of the section, here the book's training on the smoke preset.
    book = TrainConfig.model_validate(TrainConfig().model_dump(mode="json"))
    cfg = resolve("smoke", train=book)
    assert cfg.train == TrainConfig() and cfg.train.epochs == 500 and cfg.train.batch_size == 32
    assert cfg.model == preset_config("smoke").model  # sections not given stay the preset's


def test_section_values_are_the_fields_set() -> None:
    assert section_values(None) == {}
    assert section_values(TrainConfig()) == {}
    assert section_values(TrainConfig.model_validate({"epochs": 7, "lr": 0.5})) == {"epochs": 7, "lr": 0.5}
    assert section_values(ModelConfig(embedding_dim=None)) == {"embedding_dim": None}
    assert section_values({"cell": "gru"}) == {"cell": "gru"}
    assert len(section_values(preset_config("full-book").train)) >= 10  # a preset's own values count as set


def test_sections_refuse_out_of_range_values_up_front() -> None:
    with pytest.raises(ValidationError, match="num_layers"):
        ModelConfig(num_layers=0)
    with pytest.raises(ValidationError, match="sha1"):
        DataConfig(sha1="xyz")
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"unknown": 1})


def _prop(model, name: str) -> dict:
    return json.loads(json.dumps(model.model_json_schema()))["properties"][name]


def _bounds(prop: dict) -> dict:
    branch = next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")
    return {
        k: v
        for k, v in branch.items()
        if k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern")
    }


@pytest.mark.parametrize(
    "section, name, bounds, plain",
    [
        (ModelConfig, "num_layers", {"minimum": 1, "maximum": 16}, True),
        (ModelConfig, "dropout", {"minimum": 0.0, "exclusiveMaximum": 1.0}, True),
        (TrainConfig, "lr", {"exclusiveMinimum": 0.0, "maximum": 100.0}, True),
        (TrainConfig, "epochs", {"minimum": 1, "maximum": 100000}, True),
        (TrainConfig, "batch_size", {"minimum": 1, "maximum": 65536}, True),
        (DataConfig, "sha1", {"pattern": "^[0-9a-fA-F]{40}$"}, False),
        (SampleConfig, "num_tokens", {"minimum": 1, "maximum": 10000}, True),
    ],
)
def test_section_schema_has_bounds_titles_and_plain_types(section, name: str, bounds: dict, plain: bool) -> None:
    """The schema Prefect's form is built from: a field that is never empty is a plain typed field, no toggle."""
    prop = _prop(section, name)
    assert _bounds(prop) == bounds
    assert prop["title"] == section.model_fields[name].title
    assert prop["description"] == section.model_fields[name].description
    assert ("anyOf" not in prop) is plain
    assert prop.get("default") == section.model_fields[name].default


def test_flat_lists_every_value() -> None:
    flat = RunConfig().flat()
    assert flat["preset"] == "d2l-9.3"
    assert flat["train.batch_size"] == 32 and flat["model.num_hiddens"] == 256
    assert flat["data.max_tokens"] == 10000 and flat["train.optimizer"] == "sgd"
    assert "data.sha1" in flat and "sample.prefixes" in flat
    n_fields = sum(len(s.model_fields) for s in (DataConfig, ModelConfig, TrainConfig, SampleConfig))
    assert len(flat) == n_fields + 1
    assert RunConfig.model_validate_json(RunConfig().model_dump_json()) == RunConfig()


def test_the_json_form_of_a_configuration_carries_no_url_credentials() -> None:
    """The one place credentials leave the corpus URL: the configuration's JSON form (MLflow params,
    checkpoints, config.json, --json); the Python values keep them for the download."""
    url = "https://reader:s3cr3t@example.org/private/corpus.txt"
    config = preset_config("smoke", {"data": {"url": url}})
    assert config.data.url == url and config.model_dump()["data"]["url"] == url
    assert config.model_dump(mode="json")["data"]["url"] == "https://example.org/private/corpus.txt"
    assert config.flat()["data.url"] == "https://example.org/private/corpus.txt"
    assert "s3cr3t" not in config.model_dump_json()


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("d2l-9.3", {}),
        ("d2l-9.3", {"train": {"epochs": 3}, "model": {"num_hiddens": 64}}),
        ("text", {"data": {"url": "my.txt"}}),
        ("text", {"data": {"url": "my.txt"}, "model": {"num_layers": 3}, "sample": {"prefixes": ["Der"]}}),
        ("smoke", {"train": {"device": "cpu", "time_budget": "5s"}}),
        ("full-book", {}),
    ],
)
def test_the_sections_the_cli_hands_a_flow_resolve_to_the_same_configuration(
    preset: str, overrides: dict[str, dict[str, object]]
) -> None:
    """The command validates once and hands the flow complete sections: resolving them again over the preset
    changes nothing (the preset's rules for sized fields and prefixes included)."""
    from deeprnn.cli.options import complete_sections

    config = resolve(preset, **overrides)
    handed = complete_sections(config)
    assert all(part.model_fields_set == set(type(part).model_fields) for part in handed.values())
    assert resolve(preset, **handed) == config
    # As Prefect hands them to the flow: validated from their JSON.
    assert (
        resolve(preset, **{k: type(v).model_validate(v.model_dump(mode="json")) for k, v in handed.items()}) == config
    )


# ----- the time budget: a duration or off, nothing that could pass for one --------------------------------


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("90s", 90.0), ("2m", 120.0), ("1h30m", 5400.0), ("1.5h", 5400.0), (" 45 ", 45.0), (1, 1.0), (600, 600.0)],
)
def test_a_time_budget_is_a_duration_of_one_second_or_more(given: object, seconds: float) -> None:
    assert TrainConfig(time_budget=given).time_budget == seconds
    assert preset_config("smoke", {"train": {"time_budget": given}}).train.time_budget == seconds


@pytest.mark.parametrize("off", ["off", " OFF ", None])
def test_off_and_the_forms_empty_field_mean_no_time_budget(off: str | None) -> None:
    assert preset_config("text", {"train": {"time_budget": off}}).train.time_budget is None


@pytest.mark.parametrize(
    "bad", ["0", "0s", 0, 0.0, "", " ", "none", "1ms", "500ms", 0.5, "2x", "-5", -5, float("nan"), float("inf"), True]
)
def test_zero_blanks_and_anything_else_are_refused_naming_what_a_time_budget_takes(bad: object) -> None:
    """0 and blanks never mean "no budget" (a five-minute run would quietly train 1,000 epochs); sub-second
    budgets leave nothing to plan from, so ``ms`` is no unit."""
    with pytest.raises(ValidationError) as refused:
        preset_config("text", {"train": {"time_budget": bad}})
    assert "is not a time budget: give a duration such as 90s, 2m, 1h30m or 1.5h (units h, m, s;" in str(refused.value)
    assert "or off for none" in str(refused.value)


def test_the_forms_time_budget_field_is_seconds_from_one_to_thirty_days() -> None:
    assert _bounds(_prop(TrainConfig, "time_budget")) == {"minimum": 1.0, "maximum": 30 * 86400.0}


def test_num_chars_the_former_name_of_num_tokens_is_still_read() -> None:
    # Configurations, checkpoints and deployments written before the rename say sample.num_chars.
    assert SampleConfig.model_validate({"num_chars": 7}).num_tokens == 7
    assert preset_config("d2l-9.3", {"sample": {"num_chars": 9}}).sample.num_tokens == 9
    assert preset_config("smoke", {"sample": {"num_chars": 9}}).sample.num_tokens == 9  # over the preset's 20
    assert resolve("smoke", sample=SampleConfig(num_chars=8)).sample.num_tokens == 8
    assert "sample.num_tokens" in RunConfig().flat() and "sample.num_chars" not in RunConfig().flat()
    with pytest.raises(ValidationError, match="less than or equal to 10000"):
        SampleConfig.model_validate({"num_chars": 10_001})


def test_resolving_changes_neither_the_preset_nor_the_overrides_given() -> None:
    given = {"model": {"num_layers": 3}, "train": {"batch_size": 16}}
    before = copy.deepcopy(given)
    for name in PRESETS:  # with and without sections of their own for the rules to write into
        config = preset_config(name, given)
        assert config.model.size == "fixed" and config.train.min_planned_steps == 0
        assert given == before, name  # the rules wrote into a copy
    assert preset_config("text").model.size == "auto" and preset_config("text").train.min_planned_steps == 4000
