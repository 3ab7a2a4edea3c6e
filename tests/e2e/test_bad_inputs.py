"""Bad input and faults inside one process: the real flow under Prefect's harness, a real sqlite MLflow store,
the corpus over HTTP from a real server on 127.0.0.1. Each case checks what the user sees and what is kept."""

from __future__ import annotations

import errno
import gzip
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pytest
import torch
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from small_disk import small_disk
from typer.testing import CliRunner

import deeprnn.tasks.pipeline_tasks as pipeline
import deeprnn.tracking.model_registry
import deeprnn.tracking.runs
import deeprnn.tracking.store
from deeprnn.cli.app import app
from deeprnn.config import preset_config
from deeprnn.data import book_tokenize as tokenize
from deeprnn.data.batching import CorpusTooShortError
from deeprnn.data.download import DownloadError, TransientDownloadError
from deeprnn.data.prepare import CacheWriteError
from deeprnn.device import DeviceUnavailableError
from deeprnn.flows.train_flow import train_lm
from deeprnn.tracking.store import TrackingUnavailableError
from deeprnn.training import checkpoint
from deeprnn.training.divergence import TrainingDivergedError
from deeprnn.training.resume import ResumeError

pytestmark = pytest.mark.e2e

EPOCHS = 4
SECRET = "s3cr3t-pw"
CPU = {"device": "cpu", "epochs": EPOCHS, "checkpoint_every": 1}


@dataclass
class Case:
    """One test's own experiment, runs folder and corpus cache in the module's shared MLflow store."""

    root: Path
    experiment: str
    runs_dir: Path
    cache: Path

    def run(self, **kwargs: Any) -> dict[str, Any]:
        """Run the training flow in this case's experiment and runs folder."""
        return train_lm(experiment=self.experiment, runs_dir=str(self.runs_dir), **kwargs)

    def runs(self) -> list[Any]:
        """This case's MLflow runs."""
        client = MlflowClient()
        found = client.get_experiment_by_name(self.experiment)
        return client.search_runs([found.experiment_id]) if found else []


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Iterator[Path]:
    """One sqlite MLflow store for the module (creating one takes seconds); each test has its experiment."""
    root = tmp_path_factory.mktemp("bad-inputs") / "a" / "b" / "c" / "work"
    root.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow puts a sqlite store's artifacts under ./mlruns
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("DEEPRNN_CACHE_DIR", str(root / "cache"))
        deeprnn.tracking.store.check_reachable()
        yield root


@pytest.fixture
def case(store: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Case:
    """This test's experiment (named after it), runs folder and empty corpus cache."""
    name = request.node.name.removeprefix("test_")[:60]
    monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(store / "cache" / name))
    return Case(store, name, store / "runs" / name, store / "cache" / name)


def _steps(run_id: str, key: str = "train_perplexity") -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, key))


def _task_runs(flow_run_id: str, name: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [r for r in runs if r.name.startswith(name)]


# ----- bad input, refused before the expensive part ---------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_missing_device_is_refused_before_download_and_before_any_mlflow_run(case: Case, fault_server) -> None:
    url = fault_server.url("/device-check/timemachine.txt")
    with pytest.raises(DeviceUnavailableError, match="'cuda' was requested but this machine has no usable CUDA GPU"):
        case.run(preset="smoke", data={"url": url}, train={"device": "cuda"})
    assert fault_server.count("/device-check/") == 0
    assert not case.cache.exists()
    assert case.runs() == []


def test_corpus_too_short_names_both_numbers_and_stops_before_training(case: Case, fault_server) -> None:
    url = fault_server.url("/short/timemachine.txt")
    with pytest.raises(CorpusTooShortError) as info:
        case.run(preset="smoke", data={"url": url, "max_tokens": 100}, train=CPU)
    message = str(info.value)
    assert "has 100 tokens" in message and "batch_size 8 x num_steps 16" in message and "at least 145" in message
    (run,) = case.runs()
    assert run.info.status == "FAILED"
    assert _steps(run.info.run_id) == []  # not one epoch was trained
    assert not any(case.runs_dir.rglob("*.pt"))


def test_unreachable_mlflow_fails_within_seconds_before_downloading(
    case: Case, fault_server, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.replace("http://", f"http://admin:{SECRET}@"))
    started = time.monotonic()
    with pytest.raises(
        TrackingUnavailableError, match=f"MLflow tracking server {re.escape(uri)} is unreachable"
    ) as info:
        case.run(preset="smoke", data={"url": fault_server.url("/no-mlflow/timemachine.txt")}, train=CPU)
    assert time.monotonic() - started < 15  # MLflow's own client would retry for minutes
    assert SECRET not in str(info.value)
    assert fault_server.count("/no-mlflow/") == 0
    assert not case.cache.exists()


def test_http_404_fails_at_once_naming_the_url_without_its_credentials(case: Case, fault_server) -> None:
    url = fault_server.url("/missing/http-404/timemachine.txt")  # a path of its own: the server is shared
    with pytest.raises(DownloadError, match=f"HTTP 404 .* for {url} \\(check the URL\\)") as info:
        case.run(preset="smoke", data={"url": url.replace("http://", f"http://reader:{SECRET}@")}, train=CPU)
    assert SECRET not in str(info.value)
    assert fault_server.count("/missing/http-404/") == 1  # neither the HTTP session nor Prefect retried
    assert case.runs() == []  # the corpus comes before the MLflow run: no run for a text that cannot be had
    assert not case.cache.exists() or not any(case.cache.iterdir())


def test_http_500_is_retried_with_backoff_then_fails_clearly(
    case: Case, fault_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real task and its real retries; only the pause between Prefect's attempts is shortened.
    monkeypatch.setattr(pipeline, "download_corpus", pipeline.download_corpus.with_options(retry_delay_seconds=0))
    url = fault_server.url("/broken/http-500/timemachine.txt")  # a path of its own: the server is shared
    with pytest.raises(TransientDownloadError, match=f"HTTP 500 .* for {url} .*; gave up after 3 attempts$"):
        case.run(preset="smoke", data={"url": url}, train=CPU)
    # One retry layer: 3 Prefect attempts (the task's retries=2) of exactly 1 GET each, no HTTP-level retries.
    assert fault_server.count("/broken/http-500/") == 3
    assert case.runs() == []  # the corpus comes before the MLflow run: no run for a text that cannot be had
    assert not case.cache.exists() or not any(case.cache.iterdir())


def test_a_corrupt_gzip_corpus_is_refused_before_any_training(case: Case, book_path: Path) -> None:
    corrupt = case.root / "inputs" / "corrupt.txt.gz"
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_bytes(gzip.compress(book_path.read_bytes())[:-1000])  # cut short: truncated
    with pytest.raises(DownloadError, match=f"{re.escape(str(corrupt))} is not a valid gzip file: .*truncated"):
        case.run(preset="smoke", data={"url": str(corrupt)}, train=CPU)
    assert case.runs() == []  # the corpus comes before the MLflow run: no run for a text that cannot be had
    assert not any(case.runs_dir.rglob("*.pt"))


def test_a_full_disk_under_the_token_cache_fails_the_run_with_one_message_and_keeps_nothing(
    case: Case, book_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with small_disk(case.root / "small-disks" / case.experiment, "100k") as disk:  # the book's tokens need more
        monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(disk))
        with pytest.raises(CacheWriteError) as info:
            case.run(preset="smoke", data={"url": str(book_path)}, train=CPU)
        message = str(info.value)
        assert f"cannot write the token cache in {disk / 'tokens'}: No space left on device" in message
        assert "writes about 0.3 MB and keeps 0.2 MB" in message and "DEEPRNN_CACHE_DIR" in message  # spill and ids
        assert [p.name for p in (disk / "tokens").iterdir() if not p.name.endswith(".lock")] == []
    (run,) = case.runs()
    assert run.info.status == "FAILED"
    assert _steps(run.info.run_id) == []  # not one epoch was trained


def test_a_folder_with_a_gzip_file_trains_like_the_same_text_in_one_file(case: Case, book_path: Path) -> None:
    # The book in two parts: the first plain, the second gzip-compressed; read back in order, they are the book.
    book = book_path.read_bytes()
    cut = book.index(b"\n", len(book) // 2) + 1
    folder = case.root / "inputs" / "book-in-parts"
    (folder / "part2").mkdir(parents=True, exist_ok=True)
    (folder / "part1.txt").write_bytes(book[:cut])
    (folder / "part2" / "rest.txt.gz").write_bytes(gzip.compress(book[cut:]))
    (folder / ".git").mkdir(exist_ok=True)
    (folder / ".git" / "index").write_bytes(b"\x00 skipped")
    result = case.run(preset="smoke", data={"url": str(folder)}, train={**CPU, "epochs": 1})
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset.url"] == str(folder)
    assert int(run.data.tags["dataset.bytes"]) == cut + (folder / "part2" / "rest.txt.gz").stat().st_size
    assert int(run.data.tags["dataset.num_tokens"]) == len(_char_tokens(book))
    # A local folder is read in place: the cache holds only its prepared tokens, no copy of the text.
    assert [p.name for p in case.cache.iterdir()] == ["tokens"]


def _char_tokens(book: bytes) -> list[str]:
    """The book's character tokens as the pipeline makes them from one file."""
    return tokenize.flatten(tokenize.tokenize(tokenize.preprocess_lines(book.decode("utf-8")), "char"))


# ----- divergence ------------------------------------------------------------------------------------


def test_divergence_names_the_epoch_fails_the_run_and_keeps_the_last_good_checkpoint(case: Case, fault_server) -> None:
    # Plain SGD with weight decay far too strong for the learning rate: every step multiplies the weights by
    # (1 - lr * weight_decay) = -9, so they overflow to inf and the loss to NaN within a few epochs, even with
    # the gradient clipped (decay is applied after clipping).
    url = fault_server.url("/diverge/timemachine.txt")
    train = {**CPU, "epochs": 8, "lr": 100.0, "weight_decay": 0.1}
    with pytest.raises(TrainingDivergedError, match=r"training diverged at epoch (\d+): ") as info:
        case.run(preset="smoke", data={"url": url, "sha1": BOOK_SHA1}, train=train)
    epoch = info.value.epoch
    assert 2 <= epoch < 8  # a real divergence, after at least one good checkpoint
    (run,) = case.runs()
    assert run.info.status == "FAILED"
    assert _steps(run.info.run_id) == list(range(1, epoch))  # every finite epoch logged, nothing after

    local = case.runs_dir / run.info.run_id / "last.pt"
    logged = Path(MlflowClient().download_artifacts(run.info.run_id, "checkpoints/last.pt", str(case.runs_dir)))
    for path in (local, logged):
        saved = checkpoint.load(path)
        assert saved["epoch"] == epoch - 1, path
        assert all(torch.isfinite(t).all() for t in saved["model_state"].values()), path
    # Divergence is not worth retrying: the training task ran once.
    (task_run,) = _task_runs(run.data.tags["prefect.flow_run_id"], "train-model")
    assert task_run.run_count == 1


# ----- a fault during training: Prefect's retry continues from the last checkpoint ---------------

ESCAPING_EXPERIMENT = "../../escaped-experiment/.."
ESCAPING_PATH = "/..%2F..%2Fescaped-url/../timemachine.txt"


@pytest.fixture(scope="module")
def retried(store: Path, fault_server, book_path: Path) -> Iterator[dict[str, Any]]:
    """A full smoke run whose disk fails once, when the second checkpoint is saved (an I/O error, injected: a real
    disk cannot fail on cue), so Prefect retries the training task (a full disk is not retried: it stays full).
    Its experiment name and corpus URL path try to climb out of their folders."""
    saves: list[str] = []
    real_save = checkpoint.save

    def disk_fails_once(path: Path, payload: dict[str, Any]) -> Path:
        saves.append(f"{Path(path).name}@{payload['epoch']}")
        if len(saves) == 2:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_save(path, payload)

    base = store.parents[3]
    before = set(base.rglob("*"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", disk_fails_once)
        # The real task and its real retry; only the pause before the retry is shortened.
        mp.setattr(pipeline, "train_model", pipeline.train_model.with_options(retry_delay_seconds=0))
        mp.setenv("DEEPRNN_CACHE_DIR", str(store / "cache" / "retried"))
        result = train_lm(
            preset="smoke",
            data={"url": fault_server.url(ESCAPING_PATH)},  # no sha1: the cache name comes from the URL's hash
            train=CPU,
            sample={"num_tokens": 12},
            experiment=ESCAPING_EXPERIMENT,
            runs_dir=str(store / "runs" / "retried"),
        )
    created = set(base.rglob("*")) - before
    yield {"result": result, "saves": saves, "created": created, "root": store, "base": base}


def test_prefect_retry_of_training_continues_from_the_last_checkpoint(retried: dict[str, Any]) -> None:
    run_id = retried["result"].run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    (task_run,) = _task_runs(run.data.tags["prefect.flow_run_id"], "train-model")
    assert task_run.run_count == 2  # failed once, retried once
    # The retry resumed from the checkpoint of epoch 1, the last one saved; epoch 2 was trained again.
    assert run.data.tags["deeprnn.resumed_at_epoch"] == "1"
    assert retried["saves"] == [
        "last.pt@1",
        "last.pt@2",
        *[f"last.pt@{e}" for e in range(2, EPOCHS + 1)],
        f"model.pt@{EPOCHS}",
    ]
    # Epoch 2 reached MLflow before the failed save and again after the retry, yet it is logged once:
    # one continuous curve, every epoch once.
    for key in ("train_perplexity", "heldout_perplexity", "lr"):
        assert _steps(run_id, key) == list(range(1, EPOCHS + 1)), key
    final = checkpoint.load(Path(retried["result"].training.checkpoint))
    assert final["epoch"] == EPOCHS
    assert run.data.metrics["final_train_perplexity"] == pytest.approx(
        MlflowClient().get_metric_history(run_id, "train_perplexity")[-1].value
    )


def test_written_files_stay_in_their_folders_whatever_the_names(retried: dict[str, Any]) -> None:
    root: Path = retried["root"]
    created: set[Path] = retried["created"]
    assert created, "the run wrote nothing?"
    # ``base`` is four levels above the working folder: deep enough to catch the names' "../.." climbing.
    outside = sorted(str(p) for p in created if root not in p.parents and p != root)
    assert outside == []
    assert not [p for p in retried["base"].rglob("escaped-*")]
    allowed = {"mlflow.db", "mlflow.db.lock", "mlruns", "runs", "cache"}
    assert {p.relative_to(root).parts[0] for p in created} <= allowed
    # The experiment exists under its odd name, its artifacts live under its numeric id.
    run = MlflowClient().get_run(retried["result"].run_id)
    assert MlflowClient().get_experiment(run.info.experiment_id).name == ESCAPING_EXPERIMENT
    assert (
        root / "mlruns" / run.info.experiment_id / run.info.run_id / "artifacts" / "checkpoints" / "last.pt"
    ).is_file()
    (cached,) = (root / "cache" / "retried").glob("*.txt")
    assert cached.name.startswith("url-")


def test_typed_prefixes_are_read_by_the_models_rule_not_as_unk(
    retried: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The smoke preset keeps the book's rule (d2l): letters a-z and single spaces, nothing else.
    model = deeprnn.tracking.model_registry.load_pyfunc(f"runs:/{retried['result'].run_id}/model")
    with caplog.at_level(logging.WARNING, logger="deeprnn"):
        out = model.predict(
            pd.DataFrame({"prefix": ["Time\u2603", "TIME \u00a7", "time e", "time"]}), params={"num_tokens": 12}
        )
    assert out[0] == out[1] == out[3] and out[0].startswith("time") and len(out[0]) == len("time") + 12
    assert out[2].startswith("time e")
    assert not [r for r in caplog.records if "<unk>" in r.getMessage()]  # nothing typed was unknown to it


def test_a_model_uri_that_does_not_exist_is_a_clear_error(store: Path) -> None:
    runner = CliRunner()
    for uri in (f"runs:/{'0' * 32}/model", "models:/no-such-model@champion"):
        result = runner.invoke(app, ["generate", "--model-uri", uri])
        assert result.exit_code == 1, result.output
        assert f"cannot load model {uri!r}" in result.output
        assert "Traceback" not in result.output


# ----- resume: what it refuses, before touching the run -------------------------------------------


def test_resume_refuses_settings_that_contradict_the_checkpoint(retried: dict[str, Any]) -> None:
    run_id = retried["result"].run_id
    runs_dir = str(retried["root"] / "runs" / "retried")
    done = _steps(run_id)
    with pytest.raises(ResumeError, match=r"train\.lr: the checkpoint has 1\.0, given 0\.5") as info:
        train_lm(resume_run_id=run_id, runs_dir=runs_dir, train={"lr": 0.5, "num_steps": 16})
    assert "num_steps" not in str(info.value)  # restating a stored value is fine
    with pytest.raises(ResumeError, match=f"already FINISHED its {done[-1]} epochs"):
        train_lm(resume_run_id=run_id, runs_dir=runs_dir)
    with pytest.raises(ResumeError, match="belongs to experiment"):
        train_lm(resume_run_id=run_id, runs_dir=runs_dir, experiment="another", train={"epochs": done[-1] + 1})
    with pytest.raises(LookupError, match=f"no MLflow run '{'f' * 32}'"):
        train_lm(resume_run_id="f" * 32, runs_dir=runs_dir)
    with pytest.raises(ResumeError, match="is not an MLflow run id"):
        train_lm(resume_run_id="../" + run_id, runs_dir=runs_dir)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and _steps(run_id) == done  # refused before anything changed


def test_resume_with_more_epochs_fetches_the_checkpoint_from_mlflow_when_the_local_one_is_gone(
    retried: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = retried["result"].run_id
    runs_dir = retried["root"] / "runs" / "retried"
    shutil.rmtree(runs_dir / run_id)  # as on another machine
    monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(retried["root"] / "cache" / "retried"))
    done = _steps(run_id)[-1]
    result = train_lm(resume_run_id=run_id, runs_dir=str(runs_dir), train={"epochs": done + 1})
    assert result.run_id == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["deeprnn.resumed_at_epoch"] == str(done)
    assert run.data.tags["resumed.train.epochs"] == str(done + 1)
    assert run.data.params["train.epochs"] == str(EPOCHS)  # params are never rewritten
    for key in ("train_perplexity", "heldout_perplexity"):
        assert _steps(run_id, key) == list(range(1, done + 2)), key
    assert checkpoint.load(runs_dir / run_id / "last.pt")["epoch"] == done + 1


def test_cli_refuses_a_bad_resume_before_starting_anything(store: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["run", "--resume", "../../etc"])
    assert result.exit_code == 2 and "--resume: '../../etc' is not an MLflow run id" in result.output
    result = runner.invoke(app, ["run", "--resume", "0" * 32, "--preset", "smoke"])
    assert result.exit_code == 2 and "--preset cannot be combined with --resume" in result.output
    result = runner.invoke(app, ["run", "--resume", "0" * 32, "--num-layers", "0"])
    assert result.exit_code == 2 and "--num-layers" in result.output


SIDE_EFFECTS: list[str] = []


class Payload:
    """Unpickling this would run ``SIDE_EFFECTS.append``: stands for code hidden in a checkpoint."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (SIDE_EFFECTS.append, ("code ran",))


def test_resume_refuses_a_checkpoint_with_pickled_code(case: Case) -> None:
    config = preset_config("smoke", {"train": {"device": "cpu"}})
    run_id = deeprnn.tracking.runs.start_run(config, case.experiment, run_name="tampered", tags={})
    MlflowClient().set_terminated(run_id, "FAILED")
    folder = case.runs_dir / run_id
    folder.mkdir(parents=True)
    tampered = {"format": checkpoint.FORMAT, "config": config.model_dump(mode="json"), "epoch": 1, "x": Payload()}
    torch.save(tampered, folder / "last.pt")
    SIDE_EFFECTS.clear()
    refused = r"holds a pickled object \(\w+\) that could run code when loaded, so it is refused"
    with pytest.raises(checkpoint.UnsafeCheckpointError, match=refused):
        case.run(resume_run_id=run_id)
    assert SIDE_EFFECTS == []
    assert MlflowClient().get_run(run_id).info.status == "FAILED"  # refused before the run was reopened
