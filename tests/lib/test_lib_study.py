"""The search space as Optuna distributions, a study that continues only with the same search, and a grid or
random sweep that continues with the points it has not finished."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from deeprnn.search.optuna_study import (
    StudyError,
    StudySpec,
    check_space,
    check_storage,
    distributions,
    enqueue_points,
    start_study,
    study_spec,
)
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
    start_study(spec)[0].enqueue_trial({"train.lr": 0.5})
    assert len(start_study(spec)[0].trials) == 1  # continued, not created again
    other = StudySpec("s", storage, {"train.lr": [0.5, 2]}, "smoke", {})
    with pytest.raises(StudyError, match="holds trials of another search"):
        start_study(other)


@pytest.mark.parametrize("search", ["grid", "random"])
def test_a_grid_or_random_sweep_run_again_runs_only_the_points_it_has_not_finished(search: str, tmp_path: Path) -> None:
    space = {"train.lr": [0.5, 1, 2], "model.num_hiddens": [8, 16]}
    max_trials = 4 if search == "random" else None
    spec = study_spec(space, "smoke", {}, search, max_trials, storage=str(tmp_path / "studies.journal"))
    points = spec.points()
    assert len(points) == (4 if search == "random" else 6) and len({str(p) for p in points}) == len(points)
    if search == "grid":  # every combination, the last field varying fastest
        assert points[:2] == [{"train.lr": 0.5, "model.num_hiddens": 8}, {"train.lr": 0.5, "model.num_hiddens": 16}]
    assert spec.sampler == {"grid": "grid", "random": "random"}[search] and spec.pruner == "none"
    study = start_study(spec)[0]
    assert enqueue_points(study, spec) == len(points)
    # Trials take the points in order, whichever worker asks.
    dims = distributions(parse_space(space))
    first, second = study.ask(dims), study.ask(dims)
    assert (first.number, first.params, second.params) == (0, points[0], points[1])
    study.tell(first, 3.0)
    study.tell(second, state=TrialState.FAIL)
    # Stopped there; run again: the failed point is enqueued again, the ones still waiting are not enqueued twice.
    again = start_study(spec)[0]
    assert enqueue_points(again, spec) == len(points) - 1
    waiting = [t.system_attrs["fixed_params"] for t in again.get_trials(states=(TrialState.WAITING,))]
    assert sorted(map(str, waiting)) == sorted(map(str, points[1:]))
    for _ in waiting:
        again.tell(again.ask(dims), 2.0)
    with pytest.raises(StudyError, match="has finished every point of this .* search: nothing is left to run"):
        check_storage(spec)
    # The default name follows the search: the same sweep again gets its study, another sweep a study of its own.
    assert spec.name.startswith(f"deeprnn-sweep-{search}-")
    assert study_spec(space, "smoke", {}, search, max_trials, storage=spec.storage).name == spec.name
    other = study_spec({**space, "train.epochs": 7}, "smoke", {}, search, max_trials, storage=spec.storage)
    assert other.name != spec.name and check_storage(other) is None
    # Another seed draws other points: a random sweep is the same search only with the same seed's draws.
    if search == "random":
        reseeded = study_spec(space, "smoke", {}, search, max_trials, seed=1)
        assert reseeded.points() != points and reseeded.name != spec.name
