"""deeprnn.config: the book's defaults, presets, bounds, overrides and the schema Prefect's form is built from."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from deeprnn.config import (
    D2L_SHA1,
    D2L_URL,
    PRESETS,
    DataConfig,
    DataOverrides,
    ModelConfig,
    ModelOverrides,
    RunConfig,
    SampleConfig,
    SampleOverrides,
    TrainConfig,
    TrainOverrides,
    is_sha1,
    preset_config,
    resolve,
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
    assert cfg.sample.prefixes == ["time traveller", "traveller"] and cfg.sample.num_chars == 50
    assert cfg.sample.temperature is None  # greedy, as the book
    assert preset_config("d2l-9.3") == cfg


def test_presets_resolve() -> None:
    assert PRESETS == ("d2l-9.3", "full-book", "smoke")
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


def test_sample_prefixes_must_not_be_empty() -> None:
    with pytest.raises(ValidationError, match="prefixes"):
        SampleConfig(prefixes=["time", ""])
    with pytest.raises(ValidationError, match="prefixes"):
        SampleConfig(prefixes=[])


def test_assignment_is_validated() -> None:
    cfg = RunConfig()
    with pytest.raises(ValidationError, match="lr"):
        cfg.train.lr = 0.0
    assert cfg.train.lr == 2.0


def test_expected_sha1() -> None:
    assert DataConfig().expected_sha1() == D2L_SHA1
    assert DataConfig(url="https://example.com/other.txt").expected_sha1() is None
    assert DataConfig(url="https://example.com/x", sha1="A" * 40).expected_sha1() == "a" * 40
    assert is_sha1(D2L_SHA1) and is_sha1("F" * 40)
    assert not is_sha1("g" * 40) and not is_sha1("a" * 41) and not is_sha1("")


def test_resolve_applies_override_models_and_dicts() -> None:
    cfg = resolve(
        "smoke",
        data=DataOverrides(max_tokens=500),
        model=ModelOverrides(num_layers=3, dropout=None),
        train={"epochs": 2, "lr": None},
        sample=SampleOverrides(),
    )
    assert cfg.preset == "smoke"
    assert cfg.data.max_tokens == 500
    assert cfg.model.num_layers == 3 and cfg.model.dropout == 0.0  # None keeps the preset's value
    assert cfg.train.epochs == 2 and cfg.train.lr == 1.0
    assert cfg.sample == preset_config("smoke").sample
    assert resolve("d2l-9.3") == RunConfig()
    with pytest.raises(ValidationError, match="num_layers"):
        resolve("d2l-9.3", model={"num_layers": 17})


def test_overrides_refuse_out_of_range_values_up_front() -> None:
    with pytest.raises(ValidationError, match="num_layers"):
        ModelOverrides(num_layers=0)
    with pytest.raises(ValidationError, match="sha1"):
        DataOverrides(sha1="xyz")
    with pytest.raises(ValidationError):
        TrainOverrides(unknown=1)
    assert ModelOverrides().model_dump(exclude_none=True) == {}


def _prop(model, name: str) -> dict:
    return json.loads(json.dumps(model.model_json_schema()))["properties"][name]


def _bounds(prop: dict) -> dict:
    branch = next(b for b in prop["anyOf"] if b.get("type") != "null")
    return {
        k: v
        for k, v in branch.items()
        if k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern")
    }


@pytest.mark.parametrize(
    "overrides, section, name, bounds",
    [
        (ModelOverrides, ModelConfig, "num_layers", {"minimum": 1, "maximum": 16}),
        (ModelOverrides, ModelConfig, "dropout", {"minimum": 0.0, "exclusiveMaximum": 1.0}),
        (TrainOverrides, TrainConfig, "lr", {"exclusiveMinimum": 0.0, "maximum": 100.0}),
        (TrainOverrides, TrainConfig, "batch_size", {"minimum": 1, "maximum": 65536}),
        (DataOverrides, DataConfig, "sha1", {"pattern": "^[0-9a-fA-F]{40}$"}),
        (SampleOverrides, SampleConfig, "num_chars", {"minimum": 1, "maximum": 10000}),
    ],
)
def test_overrides_schema_keeps_bounds_and_titles(overrides, section, name: str, bounds: dict) -> None:
    prop = _prop(overrides, name)
    assert _bounds(prop) == bounds
    assert prop["title"] == section.model_fields[name].title
    assert prop.get("default") is None
    assert prop["description"].startswith(section.model_fields[name].description)
    assert "Empty:" in prop["description"]  # says what leaving the field empty means
    # The original section's description is not changed by the copy.
    assert not section.model_fields[name].description.endswith("Empty: the preset's value.")


def test_every_section_field_has_an_override() -> None:
    for section, overrides in [
        (DataConfig, DataOverrides),
        (ModelConfig, ModelOverrides),
        (TrainConfig, TrainOverrides),
        (SampleConfig, SampleOverrides),
    ]:
        assert set(overrides.model_fields) == set(section.model_fields)
        assert all(f.default is None for f in overrides.model_fields.values())


def test_flat_lists_every_value() -> None:
    flat = RunConfig().flat()
    assert flat["preset"] == "d2l-9.3"
    assert flat["train.batch_size"] == 32 and flat["model.num_hiddens"] == 256
    assert flat["data.max_tokens"] == 10000 and flat["train.optimizer"] == "sgd"
    assert "data.sha1" in flat and "sample.prefixes" in flat
    n_fields = sum(len(s.model_fields) for s in (DataConfig, ModelConfig, TrainConfig, SampleConfig))
    assert len(flat) == n_fields + 1
    assert RunConfig.model_validate_json(RunConfig().model_dump_json()) == RunConfig()
