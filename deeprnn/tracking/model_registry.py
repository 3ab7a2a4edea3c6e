"""The logged model and the registry: log a checkpoint as a pyfunc model (signature, pinned requirements), link
its metrics, register it once per run, describe the version, move the champion alias only to a better score
on the same held-out text, and fetch or load a model back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deeprnn.generate import FORMER_NUM_TOKENS
from deeprnn.tracking import naming
from deeprnn.tracking.store import is_disk_full, tracking_uri

log = logging.getLogger(__name__)

REGISTERED_MODEL = "deeprnn-lm"  # the book's models; other corpora get their own (default_registered_model)
CHAMPION = "champion"  # the alias of the best version on the same held-out text
# The registered model a run was started with (when named): a resume, on any machine, registers there too.
REGISTERED_MODEL_TAG = "deeprnn.registered_model"
_PYFUNC_CODE = Path(__file__).with_name("lm_pyfunc.py")


def pip_requirements() -> list[str]:
    """What the logged model needs, pinned to the versions it was trained with."""
    import pydantic
    import torch

    return [f"{m.__name__}=={m.__version__.split('+')[0]}" for m in (torch, mlflow, pydantic)]


MODEL_NAME = "model"  # the logged model's name within its run (``runs:/<run_id>/model``)


def default_registered_model(corpus_url: str, corpus_sha1: str) -> str:
    """The registered model a run's model goes to unless the user names one: ``deeprnn-lm`` for the book's
    corpus, else ``deeprnn-<file name>-<first 8 hex digits of its SHA-1>``, so models of different texts
    never become versions of one another."""
    if naming.is_book(corpus_sha1):
        return REGISTERED_MODEL
    return naming.experiment_name(naming.corpus_stem(corpus_url), corpus_sha1)  # the corpus's experiment's name


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        # Optional: a request without prefixes continues the model's own (its run's sample prefixes).
        inputs=Schema([ColSpec("string", "prefix", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("num_tokens", "long", 50),
                ParamSpec(FORMER_NUM_TOKENS, "long", 0),  # its former name, for older clients; 0: not given
                ParamSpec("temperature", "double", 0.0),  # 0: greedy, as the book
                ParamSpec("top_k", "long", 0),  # 0: no top-k filter
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


@dataclass(frozen=True)
class LoggedModel:
    """A model logged by a run: its id and the URI that loads it."""

    model_id: str  # m-...
    model_uri: str  # models:/<model_id>


def log_model(run_id: str, checkpoint: Path, example_prefix: str) -> LoggedModel:
    """Log the checkpoint as a pyfunc model from code (prefix in, generated text out), once per run.

    Safe to repeat: a model this run already logged is reused (a retry after a partial write finishes the
    upload into the same model rather than creating a second one). The ``deeprnn`` library travels with the
    model (``code_paths``, without the Prefect and MLflow layers), so loading it needs only the pinned
    requirements.
    """
    import pandas as pd
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    import deeprnn

    client = MlflowClient()
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    )
    # A finished one first; else one that an attempt created but did not finish uploading.
    logged = min(found, key=lambda m: m.status != LoggedModelStatus.READY, default=None)
    if logged is not None and logged.status == LoggedModelStatus.READY:
        log.info("run %s already logged model %s; reusing it", run_id, logged.model_id)
        return LoggedModel(logged.model_id, f"models:/{logged.model_id}")
    if logged is None:
        # Model.log would file the LoggedModel under the thread's active experiment; create it in the run's
        # own experiment instead, so `runs:/<run_id>/model` resolves and the UI shows it beside the run.
        logged = client.create_logged_model(
            experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id, params=dict(run.data.params)
        )
    # Model.log records the model as the run's output before it uploads anything, and the store allows that
    # record once: an attempt that failed in the upload (a full artifact store) already made it, and a second
    # one would fail with a UNIQUE constraint on every retry and resume. Look before creating it again.
    linked = any(output.model_id == logged.model_id for output in (run.outputs.model_outputs if run.outputs else []))
    with tempfile.TemporaryDirectory(prefix="deeprnn-code-") as folder:
        code = Path(folder) / "deeprnn"
        layers = shutil.ignore_patterns("__pycache__", *OUTER_LAYERS)
        shutil.copytree(Path(deeprnn.__file__).parent, code, ignore=layers)
        try:
            Model.log(
                artifact_path=None,  # deprecated positional in Model.log; ``name`` is the MLflow 3 spelling
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=None if linked else run_id,  # None: no second output record; the model keeps its source run
                python_model=str(_PYFUNC_CODE),
                artifacts={"checkpoint": str(checkpoint)},
                code_paths=[str(code)],
                pip_requirements=pip_requirements(),
                signature=_signature(),
                input_example=pd.DataFrame({"prefix": [example_prefix]}),
                model_id=logged.model_id,
                step=-1,  # Model.log copies the run's metrics of this step to the model: none; ours are linked later
            )
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            needed = checkpoint.stat().st_size + sum(p.stat().st_size for p in code.rglob("*") if p.is_file())
            raise ArtifactStoreFullError(run.info.artifact_uri, needed, run_id) from None
    return LoggedModel(logged.model_id, f"models:/{logged.model_id}")


class ArtifactStoreFullError(OSError):
    """The artifact store filled while a model was logged; the message names the store and the space needed."""

    def __init__(self, store: str, needed: int, run_id: str) -> None:
        text = (
            f"the artifact store {store} is full: logging the model needs about {needed / 1e6:,.1f} MB there "
            f"(its checkpoint and code). Free some space, then continue with `deeprnn run --resume {run_id}`: "
            "the same run logs the same model"
        )
        super().__init__(errno.ENOSPC, text)

    def __str__(self) -> str:
        return str(self.strerror)  # without the "[Errno 28]" prefix


# The layers around the library: the model's code needs none of them (``lm_pyfunc`` imports the library only).
OUTER_LAYERS = ("cli", "flows", "tasks", "ops", "tracking")


def link_model_metrics(run_id: str, model_id: str, keys: list[str]) -> dict[str, float]:
    """Attach the run's final values of ``keys`` to the logged model, with the run's training dataset, so the
    Models tab and ``search_logged_models(order_by=metrics.<key>)`` rank models by them.

    The same points (value, step, time) are re-sent with the model's id: the run's curves gain nothing, and
    repeating the call changes nothing. Returns what was linked.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    inputs = run.inputs.dataset_inputs if run.inputs else []
    name, digest = (inputs[0].dataset.name, inputs[0].dataset.digest) if inputs else (None, None)
    histories = [client.get_metric_history(run_id, key) for key in keys]
    lasts = [max(history, key=lambda m: (m.step, m.timestamp)) for history in histories if history]
    items = [
        Metric(m.key, m.value, m.timestamp, m.step, model_id, dataset_name=name, dataset_digest=digest) for m in lasts
    ]
    known = {(m.key, m.step, m.timestamp) for m in client.get_logged_model(model_id).metrics or []}
    client.log_batch(run_id, metrics=[m for m in items if (m.key, m.step, m.timestamp) not in known])
    return {m.key: m.value for m in items}


def heldout_tags(score: float, heldout_key: str) -> dict[str, str]:
    """The tags a version is compared by for the champion alias: its held-out perplexity and on what text."""
    return {"heldout_perplexity": str(score), "heldout_key": heldout_key}


def promote_if_better(name: str, version: str, score: float, heldout_key: str, tagged: bool = False) -> bool:
    """Point the ``champion`` alias at ``version`` if its held-out perplexity beats the current champion's
    on the same held-out text (``heldout_key``: corpus sha1 and split). Returns True when moved.

    ``tagged``: the version already carries ``heldout_tags`` (given when it was registered)."""
    client = MlflowClient()
    if not tagged:
        for key, value in heldout_tags(score, heldout_key).items():
            client.set_model_version_tag(name, version, key, value)
    with contextlib.suppress(MlflowException):  # no champion yet
        current = client.get_model_version_by_alias(name, CHAMPION)
        tags = current.tags or {}
        other = str(current.version) != str(version)  # the same one: a retry, champion already
        if other and tags.get("heldout_key") != heldout_key:
            log.info("champion v%s was measured on other held-out text; not comparable, keeping it", current.version)
            return False
        if other and float(tags.get("heldout_perplexity", "inf")) <= score:
            return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


@dataclass(frozen=True)
class DownloadedModel:
    """A logged deeprnn model on local disk, and where it came from."""

    model_uri: str  # pinned: models:/deeprnn-lm/3 rather than models:/deeprnn-lm@champion
    version: str | None  # its registered version, if it has one
    checkpoint: str  # local path of the model's checkpoint
    source_run_id: str | None  # the training run that logged it
    dataset_sha1: str | None  # the corpus hash that run recorded


def fetch_model(model_uri: str, dst: Path) -> DownloadedModel:
    """Download a logged deeprnn model into ``dst`` and say where it came from.

    An alias (``models:/deeprnn-lm@champion``) is pinned to its version first, so the alias moving meanwhile
    cannot mix two models. LookupError when it does not exist.
    """
    from mlflow.models import Model
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient()
    version = None
    try:
        if model_uri.startswith("models:/"):
            found = get_model_name_and_version(client, model_uri)
            if len(found) == 2:  # a registered name and version; a logged model's own id (m-...) has one part
                version = str(found[1])
                model_uri = f"models:/{found[0]}/{version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        source_run_id = mlflow.models.get_model_info(model_uri).run_id
    except (MlflowException, OSError) as exc:
        raise _not_found("fetch", model_uri, exc) from None
    flavor = Model.load(str(local / "MLmodel")).flavors.get("python_function", {})
    relative = flavor.get("artifacts", {}).get("checkpoint", {}).get("path")
    if not relative:
        raise LookupError(f"model {model_uri!r} is not a deeprnn model: it has no checkpoint artifact")
    if version is None and source_run_id:  # runs:/<id>/model: the version that run registered, if any
        registered = client.search_model_versions(f"run_id = '{source_run_id}'")
        version = str(registered[0].version) if registered else None
    tags = client.get_run(source_run_id).data.tags if source_run_id else {}
    return DownloadedModel(model_uri, version, str(local / relative), source_run_id, tags.get("dataset.sha1"))


def generation_params(model: Any, num_tokens: int, temperature: float, top_k: int, seed: int) -> dict[str, Any]:
    """The params of a request to a loaded model, with ``num_tokens`` under the name its signature declares
    (models logged before the rename call it ``num_chars``)."""
    schema = model.metadata.get_params_schema()
    names = {spec.name for spec in schema.params} if schema else set()
    key = "num_tokens" if "num_tokens" in names else FORMER_NUM_TOKENS
    return {key: num_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}


def load_pyfunc(model_uri: str) -> Any:
    """Load a logged model (``runs:/...``, ``models:/name@alias``, ...); clear error when it does not exist."""
    try:
        with warnings.catch_warnings():
            # MLflow nags about predict() type hints; this model's signature is declared explicitly instead.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
            return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise _not_found("load", model_uri, exc) from None


def _not_found(action: str, model_uri: str, exc: Exception) -> LookupError:
    """The one-line error for a model that cannot be fetched or loaded: the first line of MLflow's reason."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LookupError(f"cannot {action} model {model_uri!r} from {tracking_uri()}: {first}")


def register_tagged(
    model_uri: str, name: str, run_id: str | None = None, tags: dict[str, str] | None = None
) -> tuple[str, bool]:
    """Register a logged model as a new version of ``name``, once, with ``tags`` on the new version from its
    creation (one request rather than two per tag). Returns the version and whether it was created now: when
    ``run_id`` already has a version of ``name`` (an earlier attempt of the same task registered it), that
    version, which keeps the tags it has (the caller sets them again)."""
    client = MlflowClient()
    if run_id:
        quoted = name.replace("\\", "\\\\").replace("'", "\\'")  # safe inside a single-quoted filter
        earlier = client.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'")
        if earlier:
            version = min(earlier, key=lambda v: int(v.version))
            log.info("run %s is already %s v%s; not registering it again", run_id, name, version.version)
            return str(version.version), False
    created = mlflow.register_model(model_uri, name, await_registration_for=30, tags=tags)
    return str(created.version), True


@dataclass(frozen=True)
class ModelFacts:
    """What a registered version says about itself, in its description and as tags."""

    preset: str
    corpus_url: str  # credentials removed
    corpus_sha1: str
    token: str  # char or word
    perplexities: dict[str, float | None]  # by metric name: val_perplexity, test_perplexity, ...

    def tags(self) -> dict[str, str]:
        """The facts as MLflow tags (perplexities under their metric names; missing ones left out)."""
        values: dict[str, Any] = {**vars(self), **self.perplexities}
        return {k: str(v) for k, v in values.items() if v is not None and k != "perplexities"}


def describe_version(
    name: str, version: str, model_id: str, facts: ModelFacts, sample: str | None, tagged: bool = False
) -> None:
    """Say on the registered version (description and tags) and on its logged model (tags) what it is:
    its ``facts`` and one generated ``sample``. ``tagged``: the version already carries ``facts.tags()``
    (given when it was registered)."""
    client = MlflowClient()
    tags = facts.tags()
    lines = [
        f"deeprnn language model, preset {facts.preset}, trained on {facts.corpus_url} (SHA-1 {facts.corpus_sha1})."
    ]
    held_out = {k: v for k, v in facts.perplexities.items() if k.endswith("perplexity") and v is not None}
    lines += [f"- {k.replace('_', ' ')}: {v:.3f}" for k, v in held_out.items()]
    if sample:
        lines += ["", f"Greedy sample: {sample}"]
    client.update_model_version(name, version, description="\n".join(lines))
    for key, value in tags.items() if not tagged else []:
        client.set_model_version_tag(name, version, key, value)
    client.set_logged_model_tags(model_id, tags)
