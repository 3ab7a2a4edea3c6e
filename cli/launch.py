"""Starting a flow from the command line: Prefect's temporary API booted early, what the run will need loaded
while it boots, zombie runs of this host marked, and the flow run with one line for Ctrl-C or an error."""

from __future__ import annotations

import typing
from typing import Callable, TypeVar

import typer
from rich.text import Text

from cli.output import console, err, fail

if typing.TYPE_CHECKING:
    from ops.prefect_api import TemporaryAPI

Result = TypeVar("Result")


def start_prefect_api() -> TemporaryAPI | None:
    """Start Prefect's temporary API server now, in its own process, when Prefect would start one later."""
    from ops.prefect_api import PrefectAPIError, start_temporary_api

    try:
        return start_temporary_api()
    except (OSError, PrefectAPIError) as exc:
        fail(f"could not start Prefect's temporary API server: {exc}", 1)


def wait_for_api(api: TemporaryAPI | None, preload: bool) -> None:
    """Wait until the temporary API answers; meanwhile load what the run will need later (``preload``).

    Against a running API server (``api`` is None) there is nothing to wait for, and what the run needs is
    loaded now all the same, so that it does not land inside the flow run's first tasks.
    """
    if api is None:
        for load in _PRELOADS if preload else []:
            load()
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
        fail(str(exc), 1)


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


def init_device(device: str) -> None:
    """Create the CUDA context now (about a second) while the API server is still booting."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.init()


def mark_orphaned_runs() -> None:
    """Mark this host's MLflow runs whose process was killed outright FAILED, and say how to continue them."""
    from ops.orphans import mark_orphaned_runs as mark
    from tracking.store import check_reachable

    try:
        check_reachable()  # within seconds; MLflow's own client would retry a dead server for minutes
        orphans = mark()
    except Exception:  # noqa: BLE001 - an unreachable store is the flow's check-inputs task to report, clearly
        return
    for orphan in orphans:
        console.print(
            f"deeprnn: MLflow run {orphan.run_id} was left RUNNING by a process that is gone (pid {orphan.pid}); "
            f"marked FAILED. Continue it with: deeprnn run --resume {orphan.run_id}",
            highlight=False,
            soft_wrap=True,
        )


def invoke(call: Callable[[], Result], on_interrupt: str) -> Result:
    """Run a flow; Ctrl-C exits 130 and an error exits 1, each with one line saying what happened."""
    try:
        return call()
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/yellow]: {on_interrupt}")
        raise typer.Exit(130) from None
    except Exception as exc:
        from ops.failures import message  # expected errors: their own message; others: type and message

        # One line, as written: no markup read into it, no line breaks added at the terminal's width.
        err.print(Text.assemble(("error:", "red"), " ", message(exc)), soft_wrap=True)
        raise typer.Exit(1) from None


def describe_api(api: TemporaryAPI | None) -> str:
    """Which Prefect API the flow runs report to, for the command's first lines."""
    import os

    if api is not None:
        return f"Prefect's temporary server {api.url}"
    return os.environ.get("PREFECT_API_URL", "from the Prefect profile")
