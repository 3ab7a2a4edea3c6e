"""The ``deeprnn`` command and its subcommands.

Every configuration field has its own ``--option``, generated from the pydantic models (``cli.options``), so
the CLI, the Prefect form and the configuration can never disagree. Values are validated before Prefect or
MLflow start; bad input is one ``error:`` line and exit code 2, a failed run one line and exit code 1.
"""

from __future__ import annotations

import gc
import sys

import typer

from cli.models import generate, presets
from cli.run import prepare, run
from cli.server import setup_server
from cli.sweep import sweep

app = typer.Typer(
    help="Deep RNN language models (D2L 9.3) as Prefect flows tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("run")(run)
app.command("prepare")(prepare)
app.command("generate")(generate)
app.command("presets")(presets)
app.command("sweep")(sweep)
app.command("setup-server")(setup_server)


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
