"""deeprnn.tracking.runs against a real local store: a run created once per Prefect task run, its status on every way
out, params, tags, artifacts, and reading runs back."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from deeprnn.config import preset_config
from deeprnn.data.download import CorpusFile
from deeprnn.data.vocab import Vocab
from deeprnn.tracking import run_checkpoints, runs, store


def _run_ids(experiment: str) -> list[str]:
    return [r.info.run_id for r in MlflowClient().search_runs([store.experiment_id(experiment)])]


def test_a_retried_task_run_finds_the_run_it_created(experiment: str) -> None:
    task_run = str(uuid.uuid4())
    first = runs.create_run(experiment, "trial", {"a": "1"}, {"lr": 0.5}, opened_by=task_run)
    again = runs.create_run(experiment, "trial", {"a": "1"}, {"lr": 0.5}, opened_by=task_run)
    assert again == first and _run_ids(experiment) == [first]
    assert runs.get_run(first).tags[runs.OPENED_BY_TAG] == task_run
    other = runs.create_run(experiment, "trial", {}, {}, opened_by=str(uuid.uuid4()))
    assert other != first and sorted(_run_ids(experiment)) == sorted([first, other])
    with pytest.raises(ValueError, match="not a Prefect task run id"):
        runs.create_run(experiment, "trial", {}, {}, opened_by="x' OR '1'='1")


def test_a_nested_run_is_a_child_of_its_parent_and_children_come_oldest_first(experiment: str) -> None:
    parent = runs.create_run(experiment, "sweep", {}, {})
    children = [runs.create_run(experiment, f"trial-{i}", {"i": str(i)}, {}, parent_run_id=parent) for i in range(3)]
    assert [c.run_id for c in runs.child_runs(parent)] == children
    assert runs.child_runs(children[0]) == []


def test_start_run_logs_every_setting_as_a_param_without_credentials(experiment: str) -> None:
    config = preset_config(
        "smoke",
        {"data": {"url": "https://me:secret@example.org/book.txt"}, "sample": {"prefixes": ["time traveller"]}},
    )
    record = runs.get_run(runs.start_run(config, experiment, "smoke", {"deeprnn.preset": "smoke"}))
    assert len(record.params) == len(config.flat())
    assert record.params["data.url"] == "https://example.org/book.txt"
    assert record.params["sample.prefixes"] == '["time traveller"]'  # lists as JSON
    assert record.params["train.max_steps"] == ""  # None as empty
    assert record.tags["deeprnn.preset"] == "smoke" and record.status == "RUNNING"


def test_what_the_text_decides_is_not_logged_before_it_is_decided(experiment: str) -> None:
    config = preset_config("text", {"data": {"url": "https://example.org/faust.txt"}})
    record = runs.get_run(runs.start_run(config, experiment, "text", {}))
    later = {"model.size", "model.num_hiddens", "model.num_layers", "model.dropout", "train.batch_size"}
    later |= {"train.num_steps", "train.min_planned_steps", "sample.prefixes"}
    later |= {"train.eval_max_tokens", "train.final_eval_max_tokens"}  # capped at a large vocabulary
    assert set(config.flat()) - set(record.params) == later  # logged by the size-to-text task, once decided
    assert record.params["train.time_budget"] == "300.0" and record.params["data.normalize"] == "none"


@pytest.mark.parametrize(
    ("raised", "status"), [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_run_status_ends_the_run_on_every_way_out(
    experiment: str, raised: type[BaseException] | None, status: str
) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    if raised is None:
        with runs.run_status(run_id):
            pass
    else:
        with pytest.raises(raised):
            with runs.run_status(run_id):
                raise raised()
    assert runs.get_run(run_id).status == status


def test_a_run_marked_failed_says_why_and_reopening_it_forgets_that(experiment: str) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    runs.mark_failed(run_id, "process gone")
    record = runs.get_run(run_id)
    assert record.status == "FAILED" and record.tags[runs.FAILURE_REASON_TAG] == "process gone"
    runs.reopen_run(run_id, {"prefect.flow_run_id": "new"})
    record = runs.get_run(run_id)
    assert record.status == "RUNNING" and runs.FAILURE_REASON_TAG not in record.tags
    assert record.tags["prefect.flow_run_id"] == "new"
    handle = runs.find_run(run_id)
    assert (handle.run_id, handle.status, handle.experiment) == (run_id, "RUNNING", experiment)
    assert handle.tags["prefect.flow_run_id"] == "new" and runs.FAILURE_REASON_TAG not in handle.tags


def test_find_run_names_a_missing_or_deleted_run(experiment: str) -> None:
    with pytest.raises(LookupError, match="no MLflow run 'f{32}' in sqlite:///"):
        runs.find_run("f" * 32)
    run_id = runs.create_run(experiment, "run", {}, {})
    MlflowClient().delete_run(run_id)
    with pytest.raises(LookupError, match="was deleted"):
        runs.find_run(run_id)


def test_texts_and_files_go_up_in_one_upload_and_a_retry_rewrites_them(experiment: str, tmp_path: Path) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    plot = tmp_path / "perplexity.png"
    plot.write_bytes(b"\x89PNG not really")
    runs.log_texts(run_id, {"samples.txt": "time traveller\n", "vocab.json": '{"a": "ä"}'}, [plot])
    runs.log_texts(run_id, {"samples.txt": "the time machine\n"})
    names = sorted(a.path for a in MlflowClient().list_artifacts(run_id))
    assert names == ["perplexity.png", "samples.txt", "vocab.json"]
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/samples.txt") == "the time machine\n"
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/vocab.json") == '{"a": "ä"}'


def test_a_run_without_a_checkpoint_gives_a_clear_error_and_no_file(experiment: str, tmp_path: Path) -> None:
    run_id = runs.create_run(experiment, "run", {}, {})
    runs.log_texts(run_id, {"last.pt": "weights"})  # not where a checkpoint goes
    with pytest.raises(FileNotFoundError, match="never reached its first checkpoint"):
        run_checkpoints.fetch_checkpoint(run_id, tmp_path / "other" / "last.pt")
    assert list((tmp_path / "other").iterdir()) == []


def test_params_beyond_one_call_of_100_are_all_logged(experiment: str) -> None:
    params = {f"p{i:03d}": i for i in range(250)}
    run_id = runs.create_run(experiment, "run", {}, params)
    assert runs.get_run(run_id).params == {k: str(v) for k, v in params.items()}


def test_a_run_is_found_by_the_prefect_flow_run_that_opened_it(experiment: str) -> None:
    flow_run = str(uuid.uuid4())
    run_id = runs.create_run(experiment, "run", {"prefect.flow_run_id": flow_run}, {})
    assert runs.run_for_flow_run(flow_run) == run_id
    with pytest.raises(LookupError, match="was logged by Prefect flow run"):
        runs.run_for_flow_run(str(uuid.uuid4()))
    assert runs.run_url(run_id) is None  # a local store has no UI to link to
    assert runs.run_markdown(run_id) == f"`{run_id}` in `{store.tracking_uri()}`"


def test_logging_the_dataset_again_for_the_same_run_changes_nothing(experiment: str, tmp_path: Path) -> None:
    """A task retry or a resumed run logs its dataset input again: the run keeps exactly one."""
    text = tmp_path / "timemachine.txt"
    text.write_text("the time traveller\n", encoding="utf-8")
    corpus = CorpusFile(text, "a" * 40, "http://127.0.0.1:1/timemachine.txt", text.stat().st_size)
    vocab = Vocab(list("the time traveller"))
    run_id = runs.create_run(experiment, "run", {}, {})
    runs.log_dataset(run_id, corpus, vocab, 18)
    runs.log_dataset(run_id, corpus, vocab, 18)
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("timemachine.txt", "a" * 10)]
