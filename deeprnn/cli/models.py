"""``deeprnn generate`` (continuations from a logged model) and ``deeprnn presets``."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Column, Table

from deeprnn.cli.output import console, fail
from deeprnn.config import PRESETS, preset_config


def generate(
    model_uri: str = typer.Option(..., "--model-uri", help="runs:/<run_id>/model, models:/deeprnn-lm@champion, ..."),
    prefix: Optional[list[str]] = typer.Option(
        None,
        "--prefix",
        help="Text to continue (repeatable: all continued as one batch, one line each), written as the model's "
        "corpus was (e.g. lower-cased for --normalize d2l). Default: the prefixes the model was trained with.",
        show_default=False,
    ),
    num_tokens: int = typer.Option(50, "--num-tokens", min=1, max=10000, help="Tokens to generate."),
    num_chars: Optional[int] = typer.Option(None, "--num-chars", min=1, max=10000, hidden=True),  # its former name
    temperature: Optional[float] = typer.Option(
        None, "--temperature", min=0.0, help="Sample at this temperature (default greedy)."
    ),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample among the k likeliest tokens."),
    seed: int = typer.Option(0, "--seed", min=0, help="Sampling seed."),
) -> None:
    """Print continuations from a logged model; greedy by default, so it repeats the run's logged samples."""
    if temperature is not None and temperature <= 0:
        fail("--temperature must be > 0 (leave it out for greedy decoding)")
    from deeprnn.tracking.model_registry import generation_params, load_pyfunc

    try:
        model = load_pyfunc(model_uri)
    except LookupError as exc:
        fail(str(exc), 1)
    params = generation_params(model, num_chars or num_tokens, temperature or 0.0, top_k or 0, seed)
    import pandas as pd  # MLflow's pyfunc speaks DataFrames
    from mlflow.exceptions import MlflowException

    # No --prefix: no rows, and the model continues its own prefixes (those its run's samples were made from).
    rows = pd.DataFrame({"prefix": pd.Series(prefix or [], dtype=object)})
    try:  # every --prefix in one batch: one forward step per token for all of them
        texts = model.predict(rows, params=params)
    except MlflowException as exc:  # a refused request (empty prefix, out-of-range setting): one line
        fail(exc.message)
    for text in texts:
        typer.echo(text)


def presets(name: Optional[str] = typer.Argument(None, help="Show one preset in full.")) -> None:
    """List the named presets, or print one as JSON."""
    if name:
        try:
            typer.echo(preset_config(name).model_dump_json(indent=2))
        except ValueError as exc:
            fail(str(exc))
        return
    table = Table(Column("preset", no_wrap=True), "model", "data", "training")  # a name to type: never broken
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
