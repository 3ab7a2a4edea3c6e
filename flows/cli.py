"""The ``deeprnn`` command: run the training flow, generate from a logged model, list presets.

Every configuration field has its own ``--option``, generated from the pydantic models so the CLI, the
Prefect form and the config can never disagree. Values are validated before Prefect or MLflow start.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import typing
from typing import Any, Optional

# Library log records (download, training) go to Prefect's handlers too; must be set before Prefect loads.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "deeprnn")

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from deeprnn.config import PRESETS, DataConfig, ModelConfig, SampleConfig, TrainConfig, preset_config, resolve

app = typer.Typer(
    help="Deep RNN language models (D2L 9.3) as Prefect flows tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

SECTIONS: dict[str, type[BaseModel]] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig}
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


def _override_parameters() -> list[inspect.Parameter]:
    params = []
    for cli_name, (section, name) in OPTION_FIELDS.items():
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


def run(
    preset: Optional[str] = typer.Option(None, "--preset", help=f"Named preset: {', '.join(PRESETS)} (default d2l-9.3)."),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        metavar="RUN_ID",
        help="Continue this MLflow run from its last checkpoint, with the configuration stored in it "
        "(--epochs may extend it; --device, --checkpoint-every, --log-every may change).",
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="[train] Passes over the training tokens."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment (default: the flow's name)."),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Local folder for checkpoints, one subfolder per run."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
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
            raise typer.Exit(2)
        if preset is not None:
            err.print("[red]error:[/red] --preset cannot be combined with --resume: a resumed run keeps its own configuration")
            raise typer.Exit(2)
    try:
        config = resolve(preset or "d2l-9.3", **overrides)  # for a resume, this only validates the overrides
    except ValidationError as exc:
        err.print(f"[red]error:[/red] {_explain(exc)}")
        raise typer.Exit(2)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)

    from flows.train_flow import train_lm  # Prefect and MLflow load only once the input is known to be good
    from tasks.tracking import tracking_uri

    api = os.environ.get("PREFECT_API_URL") or "ephemeral (in-process)"
    if resume is not None:
        console.print(f"deeprnn: resuming MLflow run [bold]{resume}[/bold] from its last checkpoint")
    else:
        console.print(f"deeprnn: preset [bold]{config.preset}[/bold], {config.train.epochs} epochs, device {config.train.device}")
    console.print(f"Prefect API: {api}; MLflow tracking: {tracking_uri()}")
    try:
        result = train_lm(
            preset=config.preset, **overrides, experiment=experiment, runs_dir=runs_dir, resume_run_id=resume
        )
    except KeyboardInterrupt:
        err.print(
            "[yellow]interrupted[/yellow]: the MLflow run is marked KILLED; checkpoints are kept "
            "(continue with deeprnn run --resume RUN_ID)"
        )
        raise typer.Exit(130)
    except Exception as exc:
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(1)
    _print_result(result)
    if json_out:
        with open(json_out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)


# Typer reads the signature: add one keyword option per configuration field to ``run``.
_sig = inspect.signature(run)
_fixed = [p for p in _sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
run.__signature__ = _sig.replace(parameters=_fixed + [p for p in _override_parameters() if p.name != "epochs"])  # type: ignore[attr-defined]
run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}  # type: ignore[attr-defined]
app.command("run")(run)


def _print_result(result: dict[str, Any]) -> None:
    table = Table(title=f"MLflow run {result['run_id']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        if value is not None:
            table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    table.add_row("device / steps", f"{result['device']} / {result['step_mode']}")
    console.print(table)
    console.print(f"model: {result['model'].get('model_uri')}" + (
        f" (registered {result['model']['registered_model']} v{result['model']['version']}"
        + (", now champion)" if result["model"].get("champion") else ")")
        if "version" in result["model"] else ""
    ))
    for text in result["samples"].values():
        console.print(f"  {text}", style="green", highlight=False, markup=False)
    console.print(f"run id: {result['run_id']}")


@app.command()
def generate(
    model_uri: str = typer.Option(..., "--model-uri", help="runs:/<run_id>/model, models:/deeprnn-lm@champion, ..."),
    prefix: list[str] = typer.Option(["time traveller"], "--prefix", help="Text to continue (repeatable)."),
    num_chars: int = typer.Option(50, "--num-chars", min=1, max=10000, help="Tokens to generate."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="Sample at this temperature (default greedy)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample among the k likeliest tokens."),
    seed: int = typer.Option(0, "--seed", min=0, help="Sampling seed."),
) -> None:
    """Print continuations from a logged model; greedy by default, so it repeats the run's logged samples."""
    if temperature is not None and temperature <= 0:
        err.print("[red]error:[/red] --temperature must be > 0 (leave it out for greedy decoding)")
        raise typer.Exit(2)
    from tasks.tracking import load_pyfunc

    try:
        model = load_pyfunc(model_uri)
    except LookupError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1)
    params = {"num_chars": num_chars, "temperature": temperature or 0.0, "top_k": top_k or 0, "seed": seed}
    import pandas as pd  # MLflow's pyfunc speaks DataFrames

    for text in model.predict(pd.DataFrame({"prefix": prefix}), params=params):
        typer.echo(text)


@app.command()
def presets(name: Optional[str] = typer.Argument(None, help="Show one preset in full.")) -> None:
    """List the named presets, or print one as JSON."""
    if name:
        try:
            typer.echo(preset_config(name).model_dump_json(indent=2))
        except ValueError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2)
        return
    table = Table("preset", "model", "data", "training")
    for p in PRESETS:
        c = preset_config(p)
        table.add_row(
            p,
            f"{c.model.cell} {c.model.num_layers}x{c.model.num_hiddens}, dropout {c.model.dropout}",
            f"max_tokens {c.data.max_tokens}, val {c.data.val_fraction}, test {c.data.test_fraction}",
            f"{c.train.optimizer} lr {c.train.lr}, batch {c.train.batch_size}x{c.train.num_steps}, {c.train.epochs} epochs",
        )
    console.print(table)


def main() -> None:
    """Entry point for ``python -m flows.cli``."""
    app()


if __name__ == "__main__":
    sys.exit(main())
