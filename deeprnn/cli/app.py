"""The ``deeprnn`` command and its subcommands.

Every configuration field has its own ``--option``, generated from the pydantic models (``deeprnn.cli.options``), so
the CLI, the Prefect form and the configuration can never disagree. Values are validated before Prefect or
MLflow start; bad input is one ``error:`` line and exit code 2, a failed run one line and exit code 1.
"""

from __future__ import annotations

import gc
import sys

import typer

from deeprnn.cli.help_format import Command, Group
from deeprnn.cli.models import generate, presets
from deeprnn.cli.run import prepare, run
from deeprnn.cli.server import setup_server
from deeprnn.cli.sweep import sweep

app = typer.Typer(
    cls=Group,
    help="Deep RNN language models (D2L 9.3) as Prefect flows tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: at 80 columns (a terminal, a pipe, a CI log) every option name stays whole and a
    # description gets the rest of the line, or the next line, instead of a narrow column of a rich table.
    rich_markup_mode=None,
)
# Short help written out: the command list would otherwise cut each docstring's first line to 45 characters.
app.command("run", short_help="Train, evaluate and log a model (the training flow).", cls=Command)(run)
app.command("prepare", short_help="Download and tokenize a corpus into the token cache.", cls=Command)(prepare)
app.command("generate", short_help="Continue prefixes with a logged model.", cls=Command)(generate)
app.command("presets", short_help="List the presets, or print one as JSON.", cls=Command)(presets)
app.command("sweep", short_help="Grid, random or adaptive (Optuna) search, one model per trial.", cls=Command)(sweep)
app.command("setup-server", short_help="Prepare a Prefect server for unattended runs.", cls=Command)(setup_server)


def main() -> None:
    """Entry point of the ``deeprnn`` command and of ``python -m deeprnn.cli.app``."""
    try:
        app()
    finally:
        # The command's work is done. Freezing the objects alive now spares the interpreter's last garbage
        # collections from walking all of them at exit (1-2 s with torch, Prefect and MLflow loaded); they are
        # still freed as usual. Prefect's log flush and the API server's stop still run after this.
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
