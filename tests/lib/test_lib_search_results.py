"""deeprnn.search.ranking: trials ranked by held-out perplexity (failures last), as CSV and markdown."""

from __future__ import annotations

import csv
import io

from deeprnn.search.ranking import TrialResult, rank, selection_metric, table_csv, table_markdown


def _result(index: int, status: str, **metrics: float) -> TrialResult:
    return TrialResult(
        index,
        f"trial-{index}",
        {"train.lr": index},
        status,
        f"run{index}",
        dict(metrics),
        None if status == "FINISHED" else "CorpusTooShortError: too few tokens",
    )


def test_ranking_puts_best_held_out_first_and_failures_last() -> None:
    results = [
        _result(0, "FINISHED", test_perplexity=12.0),
        _result(1, "FAILED"),
        _result(2, "FINISHED", test_perplexity=9.5),
        _result(3, "FINISHED", test_perplexity=float("nan")),
    ]
    assert selection_metric(results) == "test_perplexity"
    assert [r.index for r in rank(results)] == [2, 0, 1, 3]
    # With a validation split on every finished trial, the choice never looks at the test split.
    with_val = [
        _result(0, "FINISHED", val_perplexity=5.0, test_perplexity=9.0),
        _result(1, "FINISHED", val_perplexity=6.0, test_perplexity=8.0),
    ]
    assert selection_metric(with_val) == "val_perplexity"
    assert [r.index for r in rank(with_val)] == [0, 1]

    rows = list(csv.DictReader(io.StringIO(table_csv(results))))
    assert [(r["trial"], r["status"]) for r in rows] == [
        ("2", "FINISHED"),
        ("0", "FINISHED"),
        ("1", "FAILED"),
        ("3", "FINISHED"),
    ]
    assert rows[2]["error"].startswith("CorpusTooShortError") and rows[0]["train.lr"] == "2"
    markdown = table_markdown(results, lambda run_id: f"http://mlflow/#/runs/{run_id}")
    lines = markdown.splitlines()
    assert lines[0].startswith("| trial | status | train.lr | test_perplexity |")
    assert "[run2](http://mlflow/#/runs/run2)" in lines[2] and "9.500" in lines[2]
    assert "`run1`" not in markdown and "FAILED" in lines[4]
