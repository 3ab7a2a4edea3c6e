"""deeprnn.search.space: spaces from YAML and the command line, grid and random expansion, trial configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from deeprnn.search.space import (
    Range,
    SearchSpace,
    SearchSpaceError,
    Trial,
    expand,
    field_path,
    load_space,
    make_trial,
    parse_space,
    parse_values,
)


def plan_trials(preset: str, overrides: dict | None, space: SearchSpace) -> list[Trial]:
    """Every grid point of ``space`` as a trial, as a grid sweep's study enqueues them."""
    return [make_trial(preset, overrides, space, index, values) for index, values in enumerate(expand(space))]


def test_field_names_resolve_to_section_paths() -> None:
    assert field_path("model.cell") == "model.cell"
    assert field_path("lr") == "train.lr"
    assert field_path("num-layers") == "model.num_layers"
    assert field_path("hidden_size") == "model.num_hiddens"
    assert field_path("learning_rate") == field_path("train.learning_rate") == "train.lr"
    with pytest.raises(SearchSpaceError, match="ambiguous: write one of train.seed, sample.seed"):
        field_path("seed")
    with pytest.raises(SearchSpaceError, match="unknown configuration field 'learning_rat'"):
        field_path("learning_rat")
    with pytest.raises(SearchSpaceError, match="did you mean.*num_layers"):
        field_path("num_layer")


def test_parse_space_splits_dimensions_fixed_values_and_ranges() -> None:
    space = parse_space(
        {
            "model": {"cell": ["lstm", "gru", "lstm"]},
            "lr": [0.5, 1],
            "train.epochs": 3,
            "dropout": [0.1],
            "train.clip_norm": {"low": 0.1, "high": 10, "log": True},
        }
    )
    assert space.dims["model.cell"] == ["lstm", "gru"]  # duplicates dropped, order kept
    assert space.dims["train.lr"] == [0.5, 1]
    assert space.dims["train.clip_norm"] == Range(0.1, 10.0, log=True, integer=False)
    assert space.fixed == {"train.epochs": 3, "model.dropout": 0.1}  # one value is not a dimension
    assert space.grid_size() is None
    with pytest.raises(SearchSpaceError, match="train.lr is given twice"):
        parse_space({"lr": [1, 2], "train.lr": [3]})
    with pytest.raises(SearchSpaceError, match="empty"):
        parse_space({"lr": []})
    with pytest.raises(SearchSpaceError, match="log range needs low > 0"):
        parse_space({"lr": {"low": 0, "high": 1, "log": True}})
    with pytest.raises(SearchSpaceError, match="low <= high"):
        parse_space({"lr": {"low": 2, "high": 1}})


def test_grid_is_every_combination_in_order() -> None:
    space = parse_space({"cell": ["lstm", "gru"], "num_layers": [1, 2, 3]})
    trials = expand(space)
    assert trials == [{"model.cell": c, "model.num_layers": n} for c in ("lstm", "gru") for n in (1, 2, 3)]
    with pytest.raises(SearchSpaceError, match="the grid has 6 trials, more than 4.*--random"):
        expand(space, max_trials=4)
    with pytest.raises(SearchSpaceError, match="ranges need random search"):
        expand(parse_space({"lr": {"low": 0.1, "high": 1}}))


def test_random_search_draws_distinct_points_reproducibly() -> None:
    space = parse_space({"cell": ["lstm", "gru", "rnn"], "num_layers": [1, 2, 3], "lr": [0.5, 1, 2, 4]})
    first = expand(space, random_search=True, max_trials=10, seed=7)
    assert len(first) == 10
    assert len({tuple(t.values()) for t in first}) == 10  # no point drawn twice
    grid = expand(space)
    assert all(t in grid for t in first)
    assert expand(space, random_search=True, max_trials=10, seed=7) == first
    assert expand(space, random_search=True, max_trials=10, seed=8) != first
    # Asking for more than the grid holds gives the whole grid, each point once.
    everything = expand(space, random_search=True, max_trials=100, seed=0)
    assert sorted(map(str, everything)) == sorted(map(str, grid))


def test_random_search_over_a_grid_of_more_than_2_63_points_draws_from_its_lists() -> None:
    names = ["train.lr", "model.num_hiddens", "train.batch_size", "train.num_steps", "train.epochs"]
    names += ["model.num_layers", "sample.num_tokens"]
    space = parse_space({name: list(range(1, 1001)) for name in names})  # 1000**7 points: past numpy's indices
    assert space.grid_size() > 2**63
    draws = expand(space, random_search=True, max_trials=20, seed=3)
    assert len(draws) == 20 and len({tuple(d.values()) for d in draws}) == 20
    assert all(set(d) == set(names) and all(1 <= v <= 1000 for v in d.values()) for d in draws)
    assert expand(space, random_search=True, max_trials=20, seed=3) == draws


def test_random_search_samples_ranges_within_bounds() -> None:
    space = parse_space(
        {"lr": {"low": 0.01, "high": 10, "log": True}, "num_hiddens": {"low": 8, "high": 64}, "cell": ["lstm", "gru"]}
    )
    draws = expand(space, random_search=True, max_trials=200, seed=1)
    lrs = [d["train.lr"] for d in draws]
    assert all(0.01 <= x <= 10 for x in lrs)
    # Log-uniform: about half the draws fall below the geometric middle (0.316), far more than uniform's 3%.
    assert 70 < sum(x < 0.316 for x in lrs) < 130
    hiddens = [d["model.num_hiddens"] for d in draws]
    assert all(isinstance(h, int) and 8 <= h <= 64 for h in hiddens) and len(set(hiddens)) > 20
    assert {d["model.cell"] for d in draws} == {"lstm", "gru"}


def test_trials_layer_preset_overrides_fixed_and_trial_values() -> None:
    space = parse_space({"cell": ["lstm", "gru"], "train.epochs": 2})
    trials = plan_trials("smoke", {"train": {"epochs": 5, "device": "cpu"}, "model": None}, space)
    assert [t.config.model.cell for t in trials] == ["lstm", "gru"]
    assert all(t.config.train.epochs == 2 for t in trials)  # the space's fixed value wins over the override
    assert all(t.config.train.device == "cpu" and t.config.model.num_hiddens == 32 for t in trials)  # override, preset
    assert [t.name for t in trials] == ["trial-0 cell=lstm", "trial-1 cell=gru"]
    with pytest.raises(
        SearchSpaceError, match=r"trial 1 \(model.dropout=1.5\).*model.dropout: Input should be less than 1"
    ):
        plan_trials("smoke", None, parse_space({"dropout": [0.2, 1.5]}))


def test_space_from_yaml_and_values_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("model:\n  cell: [lstm, gru]\ntrain.lr: [0.5, 1]\nclip_norm: null\n", encoding="utf-8")
    space = parse_space(load_space(path))
    assert space.dims == {"model.cell": ["lstm", "gru"], "train.lr": [0.5, 1]}
    assert space.fixed == {"train.clip_norm": None}
    (tmp_path / "bad.yaml").write_text("- lr\n", encoding="utf-8")
    with pytest.raises(SearchSpaceError, match="must map configuration fields to values"):
        load_space(tmp_path / "bad.yaml")
    with pytest.raises(SearchSpaceError, match="cannot read search space file"):
        load_space(tmp_path / "missing.yaml")
    assert parse_values("0.5, 1,2") == [0.5, 1, 2]
    assert parse_values("lstm,gru") == ["lstm", "gru"]
    assert parse_values("null,1") == [None, 1]
    with pytest.raises(SearchSpaceError, match="separated by commas"):
        parse_values("1,,2")
