"""The ``deeprnn`` command: run the training flow, sweep a search space, generate from a logged model, list presets.

Every configuration field has its own ``--option``, generated from the pydantic models so the CLI, the
Prefect form and the config can never disagree. Values are validated before Prefect or MLflow start.
"""

from __future__ import annotations

import gc
import inspect
import json
import os
import sys
import time
import typing
from dataclasses import replace
from typing import Any, Callable, Optional, TypeVar

# Library log records (download, training) go to Prefect's handlers too; must be set before Prefect loads.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "deeprnn")
# The ephemeral API's default 20 s start-up budget is tight on a busy 2-core machine; waiting longer is cheap.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

if typing.TYPE_CHECKING:
    from ops.prefect_api import TemporaryAPI
    from tasks.results import RunResult
    from tasks.sweep import SweepSummary

from deeprnn.config import (
    PRESETS,
    DataConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    preset_config,
    resolve,
)

app = typer.Typer(
    help="Deep RNN language models (D2L 9.3) as Prefect flows tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}
# Option names that differ from the field name (clashes, or names the book's users expect).
RENAMES = {
    ("data", "url"): "data_url",
    ("data", "sha1"): "data_sha1",
    ("data", "reserved_tokens"): "reserved_token",
    ("sample", "prefixes"): "prefix",
    ("sample", "seed"): "sample_seed",
    ("sample", "num_chars"): "num_chars",
}


def _cli_type(annotation: Any) -> tuple[Any, str]:
    """A type Typer understands for a field's annotation, and a note on allowed values for the help."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) is typing.Union and args else annotation
    if typing.get_origin(base) is typing.Literal:
        return Optional[str], " Choices: " + ", ".join(map(str, typing.get_args(base))) + "."
    if typing.get_origin(base) is list:
        return Optional[list[str]], " Repeat the option for several values."
    return Optional[base], ""


def _option_fields() -> dict[str, tuple[str, str]]:
    """CLI parameter name -> (section, field) for every configuration field."""
    out = {}
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            out[RENAMES.get((section, name), name)] = (section, name)
    return out


OPTION_FIELDS = _option_fields()


def _override_parameters(sections: tuple[str, ...] = tuple(SECTIONS)) -> list[inspect.Parameter]:
    """One keyword ``typer.Option`` per field of the configuration ``sections``."""
    params = []
    for cli_name, (section, name) in OPTION_FIELDS.items():
        if section not in sections:
            continue
        info = SECTIONS[section].model_fields[name]
        typ, note = _cli_type(info.annotation)
        flag = "--" + cli_name.replace("_", "-")
        decls = [flag, f"{flag}/--no-{cli_name.replace('_', '-')}"] if typ is Optional[bool] else [flag]
        option = typer.Option(None, decls[-1], help=f"[{section}] {info.description or ''}{note}", show_default=False)
        params.append(inspect.Parameter(cli_name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=typ))
    return params


def _overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group the options the user gave into ``{section: {field: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for cli_name, value in values.items():
        if value is None or cli_name not in OPTION_FIELDS or (isinstance(value, list) and not value):
            continue
        section, name = OPTION_FIELDS[cli_name]
        out.setdefault(section, {})[name] = value
    return out


def _explain(exc: ValidationError) -> str:
    """Pydantic errors phrased with the CLI's option names."""
    by_field = {v: k for k, v in OPTION_FIELDS.items()}
    lines = []
    for e in exc.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = by_field.get(loc[:2]) if len(loc) >= 2 else None
        where = "--" + key.replace("_", "-") if key else ".".join(loc) or "configuration"
        lines.append(f"  {where}: {e['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def _resolve_or_exit(preset: str | None, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """The preset (default d2l-9.3) with the options' overrides, validated; a bad value exits 2 naming it."""
    try:
        return resolve(preset or "d2l-9.3", **overrides)
    except ValidationError as exc:
        err.print(f"[red]error:[/red] {_explain(exc)}")
        raise typer.Exit(2) from None
    except ValueError as exc:  # an unknown preset
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def run(
    preset: Optional[str] = typer.Option(
        None, "--preset", help=f"Named preset: {', '.join(PRESETS)} (default d2l-9.3)."
    ),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        metavar="RUN_ID",
        help="Continue this MLflow run from its last checkpoint, with the configuration stored in it "
        "(--epochs may extend it; --device, --checkpoint-every, --log-every may change).",
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="[train] Passes over the training tokens."),
    experiment: Optional[str] = typer.Option(
        None, "--experiment", help="MLflow experiment (default: the flow's name)."
    ),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Local folder for checkpoints, one subfolder per run."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
    registered_model: Optional[str] = typer.Option(
        None,
        "--registered-model",
        metavar="NAME",
        help="MLflow registered model to add the model to (default: deeprnn-lm for the book's corpus, "
        "deeprnn-<file>-<sha1 prefix> for any other text).",
    ),
    **options: Any,
) -> None:
    """Run the training flow: download, vocabulary, train, evaluate, generate, log to MLflow."""
    overrides = _overrides(options)
    if epochs is not None:
        overrides.setdefault("train", {})["epochs"] = epochs
    if resume is not None:
        from deeprnn.resume import ResumeError, check_run_id

        try:
            check_run_id(resume)
        except ResumeError as exc:
            err.print(f"[red]error:[/red] --resume: {exc}")
            raise typer.Exit(2) from None
        if preset is not None:
            err.print(
                "[red]error:[/red] --preset cannot be combined with --resume: a resumed run keeps its own configuration"
            )
            raise typer.Exit(2)
    _check_registered_model(registered_model)
    config = _resolve_or_exit(preset, overrides)  # for a resume, this only validates the overrides

    temporary_api = _start_prefect_api()  # boots in its own process while the flow's imports load here
    from flows.train_flow import train_lm  # Prefect and MLflow load only once the input is known to be good
    from tracking.store import tracking_uri

    _init_device(config.train.device)
    _wait_for_api(temporary_api, preload=True)
    ready_at = time.time()  # imports done and the Prefect API answering

    api = (
        f"Prefect's temporary server {temporary_api.url}"
        if temporary_api
        else os.environ.get("PREFECT_API_URL", "from the Prefect profile")
    )
    if resume is not None:
        console.print(f"deeprnn: resuming MLflow run [bold]{resume}[/bold] from its last checkpoint")
    else:
        console.print(
            f"deeprnn: preset [bold]{config.preset}[/bold], {config.train.epochs} epochs, device {config.train.device}"
        )
    console.print(f"Prefect API: {api}; MLflow tracking: {tracking_uri()}")
    _mark_orphaned_runs()
    result = _invoke(
        lambda: train_lm(
            preset=config.preset,
            **overrides,
            experiment=experiment,
            runs_dir=runs_dir,
            resume_run_id=resume,
            registered_model=registered_model,
        ),
        "the MLflow run is marked KILLED; checkpoints are kept (continue with deeprnn run --resume RUN_ID)",
    )
    result = replace(result, timings=replace(result.timings, cli_ready_at=ready_at, flow_returned_at=time.time()))
    _print_result(result)
    _write_json(result.as_record(), json_out)


def _check_registered_model(name: str | None) -> None:
    """Refuse a registered model name that MLflow's ``models:/<name>@alias`` URIs could not carry."""
    import re

    from deeprnn.config import REGISTERED_MODEL_PATTERN

    if name is not None and not re.fullmatch(REGISTERED_MODEL_PATTERN, name):
        err.print(f"[red]error:[/red] --registered-model {name!r}: use letters, digits, '.', '_' and '-' (at most 256)")
        raise typer.Exit(2)


_Result = TypeVar("_Result")


def _invoke(call: Callable[[], _Result], on_interrupt: str) -> _Result:
    """Run a flow; Ctrl-C exits 130 and an error exits 1, each with one line saying what happened."""
    try:
        return call()
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/yellow]: {on_interrupt}")
        raise typer.Exit(130) from None
    except Exception as exc:
        from rich.text import Text

        from ops.failures import message  # expected errors: their own message; others: type and message

        # One line, as written: no markup read into it, no line breaks added at the terminal's width.
        err.print(Text.assemble(("error:", "red"), " ", message(exc)), soft_wrap=True)
        raise typer.Exit(1) from None


def _mark_orphaned_runs() -> None:
    """Mark this host's MLflow runs whose process was killed outright FAILED, and say how to continue them."""
    from ops.orphans import mark_orphaned_runs
    from tracking.store import check_reachable

    try:
        check_reachable()  # within seconds; MLflow's own client would retry a dead server for minutes
        orphans = mark_orphaned_runs()
    except Exception:  # noqa: BLE001 - an unreachable store is the flow's check-inputs task to report, clearly
        return
    for orphan in orphans:
        console.print(
            f"deeprnn: MLflow run {orphan.run_id} was left RUNNING by a process that is gone (pid {orphan.pid}); "
            f"marked FAILED. Continue it with: deeprnn run --resume {orphan.run_id}",
            highlight=False,
            soft_wrap=True,
        )


def _write_json(result: dict[str, Any], path: str | None) -> None:
    """Save a flow's result as JSON when ``--json PATH`` was given."""
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)


def _start_prefect_api() -> TemporaryAPI | None:
    """Start Prefect's temporary API server now, in its own process, when Prefect would start one later."""
    from ops.prefect_api import PrefectAPIError, start_temporary_api

    try:
        return start_temporary_api()
    except (OSError, PrefectAPIError) as exc:
        err.print(f"[red]error:[/red] could not start Prefect's temporary API server: {exc}")
        raise typer.Exit(1) from None


def _wait_for_api(api: TemporaryAPI | None, preload: bool) -> None:
    """Wait until the temporary API answers; meanwhile load what the run will need later (``preload``)."""
    if api is None:
        return
    from ops.prefect_api import PrefectAPIError, startup_timeout

    timeout = startup_timeout()
    if preload:
        for load in _PRELOADS:
            if not api.starting(timeout):
                break
            load()
    try:
        api.wait(timeout)
    except PrefectAPIError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


def _load_optimizer_support() -> None:
    # Creating the first torch optimizer imports torch._dynamo (2-3 s): do it while the server boots anyway.
    import torch._dynamo  # noqa: F401


def _open_tracking_store() -> None:
    # Opening a local MLflow store (sqlite: engine and schema check) takes 1-2 s; MLflow keeps the opened
    # store, so the flow's first task reuses it. Remote stores are left to that task, which reports them.
    from tracking.store import check_reachable, tracking_uri

    if tracking_uri().startswith(("sqlite:", "file:", "/")):
        try:
            check_reachable()
        except Exception:  # noqa: BLE001 - the check-inputs task repeats this and reports it in the flow run
            pass


def _load_plotting() -> None:
    # The perplexity plot is drawn after training; matplotlib takes about a second to import.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


_PRELOADS: list[Callable[[], None]] = [_load_optimizer_support, _open_tracking_store, _load_plotting]


def _init_device(device: str) -> None:
    """Create the CUDA context now (about a second) while the API server is still booting."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.init()


# Typer reads the signature: add one keyword option per configuration field to ``run``.
_sig = inspect.signature(run)
_fixed = [p for p in _sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
run.__signature__ = _sig.replace(parameters=_fixed + [p for p in _override_parameters() if p.name != "epochs"])  # type: ignore[attr-defined]
run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command("run")(run)


def prepare(
    preset: Optional[str] = typer.Option(
        None,
        "--preset",
        help=f"Named preset whose data settings to start from: {', '.join(PRESETS)} (default d2l-9.3).",
    ),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
    **options: Any,
) -> None:
    """Download and tokenize a corpus into the token cache (once per corpus and settings), and say what it holds."""
    config = _resolve_or_exit(preset, _overrides(options))
    from deeprnn.download import DownloadError, fetch_corpus, redact_url
    from deeprnn.prepare import PrepareError, dropped_letters_warning, prepared_record, split_sizes
    from deeprnn.prepare import prepare as prepare_corpus

    started = time.perf_counter()
    try:
        corpus = fetch_corpus(config.data.url, config.data.expected_sha1())
        prepared = prepare_corpus(corpus, config.data)
    except (DownloadError, PrepareError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    seconds = time.perf_counter() - started
    warning = dropped_letters_warning(prepared)
    if warning:
        err.print(f"[yellow]warning:[/yellow] {warning}")
    sizes = split_sizes(prepared, config.data)
    table = Table(title=f"prepared {redact_url(config.data.url)}", show_header=False)
    rows = {
        "token cache": str(prepared.folder),
        "tokenized now": "no: served from the cache"
        if prepared.cache_hit
        else f"yes, in {prepared.build_seconds:.1f} s",
        "corpus sha1": corpus.sha1,
        "settings": ", ".join(f"{k} {v}" for k, v in prepared.settings.describe().items()),
        "vocabulary": f"{prepared.vocab_size:,} tokens (ids stored as {prepared.dtype})",
        "tokens": f"{prepared.num_tokens:,}",
        **{f"{name} tokens": f"{count:,}" for name, count in sizes.items()},
        "time": f"{seconds:.1f} s",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
    _write_json({**prepared_record(prepared, config.data), "seconds": seconds}, json_out)


_sig = inspect.signature(prepare)
prepare.__signature__ = _sig.replace(  # type: ignore[attr-defined]
    parameters=[p for p in _sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    + _override_parameters(("data",))
)
prepare.__annotations__ = {p.name: p.annotation for p in prepare.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command("prepare")(prepare)


def _print_result(result: RunResult) -> None:
    table = Table(title=f"MLflow run {result.run_id}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics().items():
        if value is not None:
            table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    trained = result.training
    table.add_row("device / steps", f"{trained.device} / {trained.step_mode} / {trained.precision}")
    console.print(table)
    registered = result.model.registration
    console.print(
        f"model: {result.model.logged.model_uri}"
        + (
            f" (registered {registered.registered_model} v{registered.version}"
            + (", now champion)" if registered.champion else ")")
            if registered
            else ""
        )
    )
    for text in result.samples.values():
        console.print(f"  {text}", style="green", highlight=False, markup=False)
    console.print(f"run id: {result.run_id}")


@app.command()
def generate(
    model_uri: str = typer.Option(..., "--model-uri", help="runs:/<run_id>/model, models:/deeprnn-lm@champion, ..."),
    prefix: list[str] = typer.Option(
        ["time traveller"], "--prefix", help="Text to continue (repeatable: all continued as one batch, one line each)."
    ),
    num_chars: int = typer.Option(50, "--num-chars", min=1, max=10000, help="Tokens to generate."),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", min=0.0, help="Sample at this temperature (default greedy)."
    ),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample among the k likeliest tokens."),
    seed: int = typer.Option(0, "--seed", min=0, help="Sampling seed."),
) -> None:
    """Print continuations from a logged model; greedy by default, so it repeats the run's logged samples."""
    if temperature is not None and temperature <= 0:
        err.print("[red]error:[/red] --temperature must be > 0 (leave it out for greedy decoding)")
        raise typer.Exit(2)
    from tracking.models import load_pyfunc

    try:
        model = load_pyfunc(model_uri)
    except LookupError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    params = {"num_chars": num_chars, "temperature": temperature or 0.0, "top_k": top_k or 0, "seed": seed}
    import pandas as pd  # MLflow's pyfunc speaks DataFrames
    from mlflow.exceptions import MlflowException

    try:  # every --prefix in one batch: one forward step per token for all of them
        texts = model.predict(pd.DataFrame({"prefix": prefix}), params=params)
    except MlflowException as exc:  # a refused request (empty prefix, out-of-range setting): one line
        err.print(f"[red]error:[/red] {exc.message}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    for text in texts:
        typer.echo(text)


@app.command()
def presets(name: Optional[str] = typer.Argument(None, help="Show one preset in full.")) -> None:
    """List the named presets, or print one as JSON."""
    if name:
        try:
            typer.echo(preset_config(name).model_dump_json(indent=2))
        except ValueError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        return
    table = Table("preset", "model", "data", "training")
    for p in PRESETS:
        c = preset_config(p)
        table.add_row(
            p,
            f"{c.model.cell} {c.model.num_layers}x{c.model.num_hiddens}, dropout {c.model.dropout}",
            f"max_tokens {c.data.max_tokens}, val {c.data.val_fraction}, test {c.data.test_fraction}",
            f"{c.train.optimizer} lr {c.train.lr}, batch {c.train.batch_size}x{c.train.num_steps}, "
            f"{c.train.epochs} epochs",
        )
    console.print(table)


# ----- deeprnn sweep --------------------------------------------------------------------------------------

# The dimensions the issue names get their own options; any other field goes through --param.
_SWEEP_OPTIONS = {
    "cell": "model.cell",
    "num_layers": "model.num_layers",
    "num_hiddens": "model.num_hiddens",
    "dropout": "model.dropout",
    "lr": "train.lr",
    "optimizer": "train.optimizer",
}


def _sweep_space(space_file: Optional[str], options: dict[str, Optional[str]], params: list[str]) -> dict[str, Any]:
    """The search space: the YAML file, then the dimension options, then each ``--param`` (later wins)."""
    from deeprnn.search import SearchSpaceError, field_path, load_space, parse_values

    space: dict[str, Any] = {}
    if space_file:
        space.update({field_path(k): v for k, v in load_space(space_file).items()})
    for name, text in options.items():
        if text is not None:
            space[_SWEEP_OPTIONS[name]] = parse_values(text)
    for item in params:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SearchSpaceError(
                f"--param {item!r}: write it as section.field=value[,value...], e.g. train.clip_norm=0.5,1"
            )
        space[field_path(key)] = parse_values(text)
    return space


@app.command()
def sweep(
    preset: str = typer.Option(
        "d2l-9.3", "--preset", help=f"Named preset every trial starts from: {', '.join(PRESETS)}."
    ),
    cell: Optional[str] = typer.Option(None, "--cell", help="Cell types to try, comma-separated: lstm,gru,rnn."),
    num_layers: Optional[str] = typer.Option(None, "--num-layers", help="Layer counts to try, e.g. 1,2,3."),
    num_hiddens: Optional[str] = typer.Option(None, "--num-hiddens", help="Hidden sizes to try, e.g. 128,256."),
    dropout: Optional[str] = typer.Option(None, "--dropout", help="Dropout values to try, e.g. 0,0.2."),
    lr: Optional[str] = typer.Option(None, "--lr", help="Learning rates to try, e.g. 0.5,1,2."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="Optimizers to try: sgd,adam,adamw."),
    param: list[str] = typer.Option(
        [], "--param", help="Any field: section.field=v1,v2 (one value: fixed for all trials). Repeatable."
    ),
    space_file: Optional[str] = typer.Option(
        None, "--space", help="YAML file mapping fields to values or {low, high, log} ranges."
    ),
    random_search: bool = typer.Option(
        False, "--random", help="Random search: draw --max-trials points instead of the whole grid."
    ),
    max_trials: Optional[int] = typer.Option(
        None,
        "--max-trials",
        min=1,
        help="Trials a random search draws (default 10); a grid larger than this is refused.",
    ),
    seed: int = typer.Option(
        0, "--seed", min=0, help="Seed of the random search (to vary the training seed: --param train.seed=0,1,2)."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training tokens, for every trial."),
    device: Optional[str] = typer.Option(
        None, "--device", help="auto, cpu, cuda or mps, for every trial; GPU trials get one GPU each."
    ),
    data_url: Optional[str] = typer.Option(None, "--data-url", help="Corpus URL or path, for every trial."),
    data_sha1: Optional[str] = typer.Option(None, "--data-sha1", help="Expected SHA-1 of the corpus."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment (default: deeprnn-sweep)."),
    runs_dir: str = typer.Option(
        "runs", "--runs-dir", help="Checkpoint folder on each worker, one subfolder per trial."
    ),
    cluster_address: Optional[str] = typer.Option(
        None,
        "--cluster-address",
        envvar="DEEPRNN_DASK_ADDRESS",
        help="Dask scheduler to use, e.g. tcp://10.0.0.5:8786. Default: a new cluster on this machine.",
    ),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        envvar="DEEPRNN_DASK_WORKERS",
        help="Worker processes of the local cluster (default: one per GPU, else one per CPU core).",
    ),
    register_best: bool = typer.Option(
        True, "--register-best/--no-register-best", help="Register the best trial's model."
    ),
    registered_model: Optional[str] = typer.Option(
        None,
        "--registered-model",
        metavar="NAME",
        help="Registered model for the best trial's model (default: deeprnn-lm for the book's corpus, "
        "deeprnn-<file>-<sha1 prefix> for any other text).",
    ),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
) -> None:
    """Grid or random search: train one model per trial on a Dask cluster; one MLflow parent run, a child per trial."""
    from deeprnn.search import SearchSpaceError, parse_space, plan_trials

    _check_registered_model(registered_model)
    dims = {
        "cell": cell,
        "num_layers": num_layers,
        "num_hiddens": num_hiddens,
        "dropout": dropout,
        "lr": lr,
        "optimizer": optimizer,
    }
    fixed = {"train": {"epochs": epochs, "device": device}, "data": {"url": data_url, "sha1": data_sha1}}
    overrides = {s: {k: v for k, v in values.items() if v is not None} for s, values in fixed.items()}
    try:
        space = _sweep_space(space_file, dims, param)
        search_space = parse_space(space)
        if not search_space.dims:
            raise SearchSpaceError(
                "nothing to sweep: give values to vary, e.g. --lr 0.5,1,2, --param train.seed=0,1 or --space FILE"
            )
        trials = plan_trials(preset, overrides, search_space, random_search, max_trials, seed)
    except ValueError as exc:  # SearchSpaceError, or an unknown preset
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None

    temporary_api = _start_prefect_api()  # boots while the imports below load, as for `deeprnn run`
    from flows.sweep_flow import sweep_lm  # Prefect, MLflow and Dask load only once the input is known to be good
    from ops.cluster import dask_task_runner
    from tracking.store import tracking_uri

    _wait_for_api(temporary_api, preload=False)

    runner = dask_task_runner(cluster_address, workers, use_gpus=trials[0].config.train.device != "cpu")
    where = cluster_address or f"a new local Dask cluster ({workers or 'default'} workers)"
    console.print(f"deeprnn sweep: {len(trials)} trials of preset [bold]{preset}[/bold] on {where}")
    console.print(f"MLflow tracking: {tracking_uri()}")
    # The workers report to the same API: PREFECT_API_URL (the temporary server's, when it runs) reaches local
    # workers through the environment and every worker through the settings the task runner sends along.
    console.print(f"Prefect API: {os.environ.get('PREFECT_API_URL', 'from the Prefect profile')}")
    _mark_orphaned_runs()

    def call() -> SweepSummary:
        return sweep_lm.with_options(task_runner=runner)(
            space=space,
            preset=preset,
            data=overrides["data"] or None,
            train=overrides["train"] or None,
            random_search=random_search,
            max_trials=max_trials,
            seed=seed,
            experiment=experiment,
            runs_dir=runs_dir,
            register_best=register_best,
            registered_model=registered_model,
        )

    result = _invoke(call, "the sweep's MLflow run is marked KILLED")
    _print_sweep(result)
    _write_json(result.as_record(), json_out)


def _print_sweep(result: SweepSummary) -> None:
    metric = result.selection_metric
    table = Table(title=f"MLflow parent run {result.parent_run_id} (ranked by {metric})", show_header=True)
    for column in ("trial", "status", metric, "run id", "error"):
        table.add_column(column)
    for t in result.trials:
        score = t.metrics.get(metric)
        table.add_row(t.name, t.status, "" if score is None else f"{score:.3f}", t.run_id or "", t.error or "")
    console.print(table)
    best, registered = result.best, result.best_model.registration
    console.print(
        f"best: {best.name} (run {best.run_id})"
        + (f", registered {registered.registered_model} v{registered.version}" if registered else "")
    )
    console.print(f"{result.trials_succeeded} of {result.trials_total} trials succeeded")


@app.command("setup-server")
def setup_server(
    training_slots: int = typer.Option(
        1,
        "--training-slots",
        min=1,
        max=64,
        help="Training runs at once across the pool's workers: one per GPU (default 1: one worker, one GPU).",
    ),
    alert_webhook: Optional[str] = typer.Option(
        None,
        "--alert-webhook",
        help="URL that gets a JSON POST for every Failed or Crashed training, evaluation or sweep run.",
    ),
    allow_private_urls: bool = typer.Option(
        False,
        "--allow-private-urls",
        help="Let alerts go to a private-network or local address (Prefect refuses them by default).",
    ),
    zombie_after: int = typer.Option(
        90,
        "--zombie-after",
        min=31,
        max=86400,
        help="Seconds without a heartbeat (sent every 30 s) after which a deployment run is marked Crashed.",
    ),
) -> None:
    """Prepare the Prefect server in PREFECT_API_URL for unattended runs: training slots, zombie detection, alerts."""
    if alert_webhook is not None and not alert_webhook.startswith(("http://", "https://")):
        err.print("[red]error:[/red] --alert-webhook must be an http:// or https:// URL")
        raise typer.Exit(2)
    from prefect.exceptions import ObjectNotFound

    from ops.automations import POOL
    from ops.automations import setup_server as setup

    try:
        done = setup(training_slots, alert_webhook, allow_private_urls, zombie_after)
    except ObjectNotFound:
        err.print(
            f"[red]error:[/red] no work pool {POOL!r} on the server: prefect work-pool create {POOL} --type process"
        )
        raise typer.Exit(1) from None
    for line in done:
        console.print(line, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of the ``deeprnn`` command and of ``python -m cli.app``."""
    try:
        app()
    finally:
        # The command's work is done. Freezing the objects alive now spares the interpreter's last garbage
        # collections from walking all of them at exit (1-2 s with torch, Prefect and MLflow loaded); they are
        # still freed as usual. Prefect's log flush and the API server's stop still run after this.
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
