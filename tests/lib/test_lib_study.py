"""The search space as Optuna distributions, and a study that continues only with the same search."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from deeprnn.search.optuna_study import StudyError, StudySpec, check_space, create_or_continue, distributions
from deeprnn.search.space import parse_space


def test_choices_ranges_and_log_scales_map_to_optuna_distributions() -> None:
    space = parse_space(
        {
            "model.cell": ["lstm", "gru"],
            "train.lr": {"low": 0.01, "high": 4, "log": True},
            "model.num_hiddens": {"low": 16, "high": 256, "log": True},
            "model.dropout": {"low": 0.0, "high": 0.5},
            "train.epochs": 3,
        }
    )
    dists = distributions(space)
    assert dists["model.cell"] == CategoricalDistribution(["lstm", "gru"])
    assert dists["train.lr"] == FloatDistribution(0.01, 4.0, log=True)
    assert dists["model.num_hiddens"] == IntDistribution(16, 256, log=True)
    assert dists["model.dropout"] == FloatDistribution(0.0, 0.5)
    assert "train.epochs" not in dists  # fixed, not searched


def test_a_space_whose_end_is_no_valid_configuration_is_refused_naming_it() -> None:
    space = parse_space({"train.lr": [0.5, 1], "model.dropout": {"low": 0.0, "high": 1.5}})
    with pytest.raises(StudyError, match=r"model\.dropout.*1\.5"):
        check_space("smoke", None, space)


def test_the_same_study_name_continues_only_the_same_search(tmp_path: Path) -> None:
    storage = str(tmp_path / "studies.journal")
    spec = StudySpec("s", storage, {"train.lr": [0.5, 1]}, "smoke", {})
    create_or_continue(spec).enqueue_trial({"train.lr": 0.5})
    assert len(create_or_continue(spec).trials) == 1  # continued, not created again
    other = StudySpec("s", storage, {"train.lr": [0.5, 2]}, "smoke", {})
    with pytest.raises(StudyError, match="holds trials of another search"):
        create_or_continue(other)
