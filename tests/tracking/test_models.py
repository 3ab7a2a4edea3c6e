"""deeprnn.tracking.model_registry against a real local store: a tiny checkpoint logged once per run as a pyfunc model,
registered once per run, described, promoted only when better on the same held-out text, fetched back."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from deeprnn.cli.app import app
from deeprnn.config import D2L_SHA1, preset_config
from deeprnn.data.vocab import Vocab
from deeprnn.model import RNNLM
from deeprnn.ops import failures
from deeprnn.tracking import model_registry, runs
from deeprnn.tracking import store as store_module
from deeprnn.training import checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 8-unit model of a few letters: enough to log, load and generate."""
    config = preset_config("smoke", {"model": {"num_hiddens": 8, "num_layers": 1}, "train": {"device": "cpu"}})
    vocab = Vocab("the time traveller machine")
    model = RNNLM.from_config(len(vocab), config.model)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return checkpoint.save(path, checkpoint.make_payload(config, vocab, model, epoch=1))


@pytest.fixture(scope="module")
def logged(tracking_store: str, tiny_checkpoint: Path) -> tuple[str, model_registry.LoggedModel]:
    """A run of its own with the tiny model logged."""
    run_id = runs.create_run("logged-models", "run", {}, {"preset": "smoke"})
    return run_id, model_registry.log_model(run_id, tiny_checkpoint, "time")


def test_a_run_logs_its_model_once_and_it_loads_and_generates(
    logged: tuple[str, model_registry.LoggedModel], tiny_checkpoint: Path
) -> None:
    run_id, model = logged
    assert model.model_uri == f"models:/{model.model_id}"
    assert model_registry.log_model(run_id, tiny_checkpoint, "time") == model  # a retry reuses it
    experiment = MlflowClient().get_run(run_id).info.experiment_id
    assert [m.model_id for m in MlflowClient().search_logged_models(experiment_ids=[experiment])] == [model.model_id]
    loaded = model_registry.load_pyfunc(f"runs:/{run_id}/model")
    (text,) = loaded.predict(pd.DataFrame({"prefix": ["time"]}), params={"num_tokens": 5})
    # Five generated tokens; an untrained model may pick <unk>, one token of five characters.
    assert text.startswith("time") and len(text.replace("<unk>", "?")) == len("time") + 5
    # num_chars, the former name, still asks for as many tokens: the same greedy text.
    assert loaded.predict(pd.DataFrame({"prefix": ["time"]}), params={"num_chars": 5}) == [text]
    with pytest.raises(MlflowException, match="param num_chars=10001: input should be less than or equal to 10000"):
        loaded.predict(pd.DataFrame({"prefix": ["time"]}), params={"num_chars": 10_001})
    with pytest.raises(LookupError, match="cannot load model 'models:/nothing-here/1'"):
        model_registry.load_pyfunc("models:/nothing-here/1")


def test_a_request_without_prefixes_continues_the_models_own_and_prefixes_follow_its_rule(
    tracking_store: str, tmp_path: Path
) -> None:
    # A model of the book's rule (d2l: lower-case letters and spaces) with prefixes of its own.
    config = preset_config(
        "smoke",
        {
            "model": {"num_hiddens": 8, "num_layers": 1},
            "data": {"normalize": "d2l"},
            "sample": {"prefixes": ["machine", "the time"]},
        },
    )
    vocab = Vocab("the time traveller machine")
    model = RNNLM.from_config(len(vocab), config.model)
    path = checkpoint.save(tmp_path / "model.pt", checkpoint.make_payload(config, vocab, model, epoch=1))
    run_id = runs.create_run("own-prefixes", "run", {}, {"preset": "smoke"})
    model_registry.log_model(run_id, path, "machine")
    loaded = model_registry.load_pyfunc(f"runs:/{run_id}/model")

    none_given = pd.DataFrame({"prefix": pd.Series([], dtype=object)})
    own = loaded.predict(none_given, params={"num_tokens": 4})
    # Continued by 4 tokens each (an untrained model may say <unk>, five characters, as one of them).
    assert len(own) == 2 and own[0].startswith("machine") and own[1].startswith("the time")
    assert loaded.predict(pd.DataFrame({"prefix": ["machine", "the time"]}), params={"num_tokens": 4}) == own
    # Typed as a person writes it: read as the corpus's rule wrote the training text, not as <unk>s.
    assert loaded.predict(pd.DataFrame({"prefix": ["MACHINE!", "The Time"]}), params={"num_tokens": 4}) == own

    # `deeprnn generate` without --prefix prints the model's own prefixes' continuations.
    result = CliRunner().invoke(app, ["generate", "--model-uri", f"runs:/{run_id}/model", "--num-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == own
    # --num-chars, the option's former name, is still taken (hidden from the help).
    former = CliRunner().invoke(app, ["generate", "--model-uri", f"runs:/{run_id}/model", "--num-chars", "4"])
    assert former.exit_code == 0 and former.stdout.splitlines() == own, former.output
    assert "--num-chars" not in CliRunner().invoke(app, ["generate", "--help"]).output


def test_a_model_is_registered_once_per_run_described_and_fetched_back(
    logged: tuple[str, model_registry.LoggedModel], tmp_path: Path
) -> None:
    run_id, model = logged
    assert model_registry.register_tagged(model.model_uri, "tiny-lm", run_id) == ("1", True)
    assert model_registry.register_tagged(model.model_uri, "tiny-lm", run_id) == (
        "1",
        False,
    )  # a retry: the same version
    assert len(MlflowClient().search_model_versions("name = 'tiny-lm'")) == 1
    facts = model_registry.ModelFacts(
        "smoke",
        "https://example.org/book.txt",
        "ab" * 20,
        "char",
        {"val_perplexity": None, "test_perplexity": 5.0, "train_perplexity_eval": 4.0},
    )
    model_registry.describe_version("tiny-lm", "1", model.model_id, facts, "time traveller")
    version = MlflowClient().get_model_version("tiny-lm", "1")
    assert version.tags == {
        "preset": "smoke",
        "corpus_url": "https://example.org/book.txt",
        "corpus_sha1": "ab" * 20,
        "token": "char",
        "test_perplexity": "5.0",
        "train_perplexity_eval": "4.0",
    }
    assert version.description.splitlines() == [
        f"deeprnn language model, preset smoke, trained on https://example.org/book.txt (SHA-1 {'ab' * 20}).",
        "- test perplexity: 5.000",
        "",
        "Greedy sample: time traveller",
    ]
    assert MlflowClient().get_logged_model(model.model_id).tags["test_perplexity"] == "5.0"

    runs.set_tags(run_id, {"dataset.sha1": "cd" * 20})
    assert model_registry.promote_if_better("tiny-lm", "1", 5.0, "the book")
    fetched = model_registry.fetch_model("models:/tiny-lm@champion", tmp_path / "fetched")
    assert (fetched.model_uri, fetched.version, fetched.source_run_id) == ("models:/tiny-lm/1", "1", run_id)
    assert fetched.dataset_sha1 == "cd" * 20
    assert checkpoint.load(Path(fetched.checkpoint))["epoch"] == 1
    by_run = model_registry.fetch_model(f"runs:/{run_id}/model", tmp_path / "by-run")
    assert by_run.version == "1" and by_run.source_run_id == run_id
    with pytest.raises(LookupError, match="cannot fetch model 'models:/tiny-lm/7'"):
        model_registry.fetch_model("models:/tiny-lm/7", tmp_path / "missing")


def test_a_version_registered_with_its_tags_has_them_from_its_creation_and_once(
    logged: tuple[str, model_registry.LoggedModel],
) -> None:
    run_id, model = logged
    tags = {"preset": "smoke", **model_registry.heldout_tags(5.0, "the book")}
    assert model_registry.register_tagged(model.model_uri, "tagged-lm", run_id, tags) == ("1", True)
    assert model_registry.register_tagged(model.model_uri, "tagged-lm", run_id, tags) == ("1", False)  # a retry
    assert MlflowClient().get_model_version("tagged-lm", "1").tags == {
        "preset": "smoke",
        "heldout_perplexity": "5.0",
        "heldout_key": "the book",
    }
    assert model_registry.promote_if_better("tagged-lm", "1", 5.0, "the book", tagged=True)  # compared by those tags


def test_the_champion_moves_only_to_a_better_score_on_the_same_heldout_text(
    logged: tuple[str, model_registry.LoggedModel],
) -> None:
    run_id, model = logged
    client = MlflowClient()
    client.create_registered_model("ranked-lm")
    for _ in range(5):
        client.create_model_version("ranked-lm", model.model_uri, run_id=run_id)

    def champion() -> str:
        return str(client.get_model_version_by_alias("ranked-lm", model_registry.CHAMPION).version)

    assert model_registry.promote_if_better("ranked-lm", "1", 10.0, "book:split") is True  # the first champion
    assert model_registry.promote_if_better("ranked-lm", "2", 12.0, "book:split") is False and champion() == "1"
    assert model_registry.promote_if_better("ranked-lm", "3", 8.0, "book:split") is True and champion() == "3"
    assert (
        model_registry.promote_if_better("ranked-lm", "3", 8.0, "book:split") is True and champion() == "3"
    )  # a retry
    assert model_registry.promote_if_better("ranked-lm", "4", 8.0, "book:split") is False  # a tie is not better
    assert model_registry.promote_if_better("ranked-lm", "5", 1.0, "other:split") is False and champion() == "3"
    tags = client.get_model_version("ranked-lm", "5").tags
    assert (tags["heldout_perplexity"], tags["heldout_key"]) == ("1.0", "other:split")


def test_each_corpus_gets_its_own_registered_model() -> None:
    assert model_registry.default_registered_model("https://example.org/timemachine.txt", D2L_SHA1) == "deeprnn-lm"
    sha1 = "0123456789abcdef" * 2 + "01234567"
    assert model_registry.default_registered_model("file:///home/me/My Notes.txt", sha1) == "deeprnn-my-notes-01234567"


def test_a_model_upload_that_fills_the_artifact_store_completes_the_same_run_once_space_is_freed(
    tracking_store: str, tiny_checkpoint: Path, small_filesystem: Path, experiment: str
) -> None:
    """The artifact store is full while the model uploads; the retry (or a later --resume) logs it into the
    same run and the same model, instead of failing on MLflow's UNIQUE constraint for ever."""
    client = MlflowClient()
    client.create_experiment(experiment, artifact_location=str(small_filesystem / "artifacts"))
    run_id = runs.create_run(experiment, "run", {}, {"preset": "smoke"})
    filler = small_filesystem / "filler"
    stats = os.statvfs(small_filesystem)
    filler.write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - 16_384))  # 16 KB left: the model needs more
    with pytest.raises(model_registry.ArtifactStoreFullError) as full:
        model_registry.log_model(run_id, tiny_checkpoint, "time")
    # One line: the store, about how much the model needs, what to do; not retried (a full disk stays full).
    said = str(full.value)
    store = client.get_run(run_id).info.artifact_uri
    assert said.startswith(f"the artifact store {store} is full: logging the model needs about ")
    needed = float(said.split("needs about ")[1].split(" MB")[0])
    assert needed * 1e6 >= tiny_checkpoint.stat().st_size and f"deeprnn run --resume {run_id}" in said
    assert "\n" not in said and "Errno" not in said and failures.message(full.value) == said
    assert failures.is_expected(full.value)
    failed = SimpleNamespace(result=lambda: (_ for _ in ()).throw(full.value))
    assert store_module.retry_on_io_faults()(None, None, failed) is False
    broken = SimpleNamespace(result=lambda: (_ for _ in ()).throw(ConnectionResetError("reset")))
    assert store_module.retry_on_io_faults()(None, None, broken) is True
    filler.unlink()  # the operator frees the disk
    model = model_registry.log_model(run_id, tiny_checkpoint, "time")
    run = client.get_run(run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]  # one model, linked once
    assert [m.model_id for m in client.search_logged_models([run.info.experiment_id])] == [model.model_id]
    assert model_registry.log_model(run_id, tiny_checkpoint, "time") == model  # and again: nothing new
    (text,) = model_registry.load_pyfunc(model.model_uri).predict(
        pd.DataFrame({"prefix": ["time"]}), params={"num_tokens": 3}
    )
    assert text.startswith("time")


def test_a_logged_model_carries_the_library_without_the_prefect_and_mlflow_layers(
    experiment: str, tiny_checkpoint: Path
) -> None:
    run_id = runs.create_run(experiment, "run", {}, {"preset": "smoke"})
    model = model_registry.log_model(run_id, tiny_checkpoint, "time")
    local = Path(mlflow.artifacts.download_artifacts(model.model_uri))
    code = local / "code" / "deeprnn"
    assert (code / "model.py").is_file() and (code / "data" / "vocab.py").is_file()
    assert (code / "training" / "checkpoint.py").is_file() and (code / "generate.py").is_file()
    assert not [layer for layer in model_registry.OUTER_LAYERS if (code / layer).exists()]
    (text,) = model_registry.load_pyfunc(model.model_uri).predict(pd.DataFrame({"prefix": ["time"]}))
    assert text.startswith("time")


def test_a_model_logged_before_the_rename_is_asked_for_num_chars() -> None:
    from mlflow.types import ParamSchema, ParamSpec

    def model_with(*names: str) -> SimpleNamespace:
        schema = ParamSchema([ParamSpec(name, "long", 50) for name in names])
        return SimpleNamespace(metadata=SimpleNamespace(get_params_schema=lambda: schema))

    assert model_registry.generation_params(model_with("num_chars", "seed"), 7, 0.0, 0, 1) == {
        "num_chars": 7,
        "temperature": 0.0,
        "top_k": 0,
        "seed": 1,
    }
    assert model_registry.generation_params(model_with("num_tokens", "num_chars"), 7, 0.0, 0, 1)["num_tokens"] == 7
