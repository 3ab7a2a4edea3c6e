"""Starting a flow from the command line: Prefect's temporary API booted early, what the run will need loaded
while it boots, zombie runs of this host marked, and the flow run with one line for Ctrl-C or an error."""

from __future__ import annotations

import contextlib
import typing
from typing import Callable, Iterator, TypeVar

import typer
from rich.text import Text

from deeprnn.cli.output import err, fail, print_line
from deeprnn.ops.password_scrub import scrub

if typing.TYPE_CHECKING:
    from deeprnn.ops.prefect_api import TemporaryAPI

Result = TypeVar("Result")


def start_prefect_api() -> TemporaryAPI | None:
    """Start Prefect's temporary API server now, in its own process, when Prefect would start one later."""
    from deeprnn.ops.prefect_api import PrefectAPIError, start_temporary_api

    try:
        return start_temporary_api()
    except (OSError, PrefectAPIError) as exc:
        fail(f"could not start Prefect's temporary API server: {exc}", 1)


def wait_for_api(api: TemporaryAPI | None, preload: bool) -> None:
    """Wait until the temporary API answers; meanwhile load what the run will need later (``preload``).

    Against a running API server (``api`` is None) there is nothing to wait for, and what the run needs is
    loaded now all the same, so that it does not land inside the flow run's first tasks.
    """
    from deeprnn.ops.prefect_api import PrefectAPIError

    for load in _PRELOADS if preload else []:
        if api is not None and not api.starting():
            break  # the server answers already: the flow run's tasks load the rest
        load()
    try:
        if api is not None:
            api.wait()
    except PrefectAPIError as exc:
        fail(str(exc), 1)


def _load_optimizer_support() -> None:
    # Creating the first torch optimizer imports torch._dynamo (2-3 s): do it while the server boots anyway.
    import torch._dynamo  # noqa: F401


def _open_tracking_store() -> None:
    # Opening a local MLflow store (sqlite: engine and schema check) takes 1-2 s; MLflow keeps the opened
    # store, so the flow's first task reuses it. Remote stores are left to that task, which reports them.
    from deeprnn.tracking.store import check_reachable, tracking_uri

    if tracking_uri().startswith(("sqlite:", "file:", "/")):
        with contextlib.suppress(Exception):  # the check-inputs task repeats this and reports it in the flow run
            check_reachable()


def _load_plotting() -> None:
    # The perplexity plot is drawn after training; matplotlib takes about a second to import.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


_PRELOADS: list[Callable[[], None]] = [_load_optimizer_support, _open_tracking_store, _load_plotting]


def init_device(device: str) -> None:
    """Refuse a device torch cannot use here (exit 1, before any flow run), and create the CUDA context now
    (about a second) while the API server is still booting."""
    import torch

    from deeprnn.device import DeviceUnavailableError, resolve_device

    try:
        resolve_device(device)  # what the fast check in deeprnn.cli.preflight could not tell without torch
    except DeviceUnavailableError as exc:
        fail(str(exc), 1)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.init()


def mark_orphaned_runs(runs_dir: str | None = None) -> None:
    """Mark this host's MLflow runs whose process was killed outright FAILED, and say how to continue them
    (only those with a checkpoint, in ``runs_dir`` or in MLflow, can be continued)."""
    from deeprnn.ops.orphans import mark_orphaned_runs as mark
    from deeprnn.tracking.store import check_reachable

    try:
        check_reachable()  # within seconds; MLflow's own client would retry a dead server for minutes
        orphans = mark(runs_dir)
    except Exception:  # noqa: BLE001 - an unreachable store is the flow's check-inputs task to report, clearly
        return
    for orphan in orphans:
        then = f"Continue it with: deeprnn run --resume {orphan.run_id}"
        if orphan.checkpoint is None:
            then = "It stopped before its first checkpoint: nothing to resume"
        print_line(
            f"deeprnn: MLflow run {orphan.run_id} was left RUNNING by a process that is gone (pid {orphan.pid}); "
            f"marked FAILED. {then}"
        )


StopMessage = Callable[[KeyboardInterrupt], str]


@contextlib.contextmanager
def exit_on_stop(on_interrupt: str | StopMessage) -> Iterator[None]:
    """A stop (Ctrl-C, SIGTERM) inside the block exits 130 (SIGINT) or 143 (SIGTERM) with one line."""
    try:
        yield
    except KeyboardInterrupt as exc:
        from deeprnn.training.stop_signals import StopRequested

        # "interrupted by SIGTERM: ..." from a message function; "interrupted: ..." before a fixed text.
        text = " " + on_interrupt(exc) if callable(on_interrupt) else ": " + on_interrupt
        err.print(Text.assemble(("interrupted", "yellow"), scrub(text)), soft_wrap=True)
        raise typer.Exit(exc.exit_code if isinstance(exc, StopRequested) else 130) from None


def invoke(call: Callable[[], Result], on_interrupt: str | StopMessage) -> Result:
    """Run a flow; a stop exits 130 or 143 and an error exits 1, each with one line saying what happened."""
    from deeprnn.ops.failures import hide_expected_failures_on_console
    from deeprnn.ops.password_scrub import scrub_log_handlers

    hide_expected_failures_on_console()  # the message below is printed once, not also in Prefect's lines
    scrub_log_handlers()  # MLflow quotes its tracking URL, password and all, in the errors of an outage
    with exit_on_stop(on_interrupt):
        try:
            return call()
        except Exception as exc:
            from deeprnn.ops.failures import message  # expected errors: their own message; others: type and message
            from deeprnn.training.stop_signals import remembered

            stop = remembered()
            if stop is not None:  # the flow run ended Cancelled on a stop signal: report the stop
                raise stop from None
            fail(message(exc), 1)


def announce_services(api: TemporaryAPI | None) -> None:
    """Where the flow runs go (Prefect's temporary server ``api``, else PREFECT_API_URL's) and the MLflow runs,
    once the Prefect API answers."""
    import os

    from deeprnn.tracking.store import tracking_uri

    prefect_api = os.environ.get("PREFECT_API_URL", "from the Prefect profile")
    if api is not None:
        prefect_api = f"Prefect's temporary server {api.url}"
    print_line(f"Prefect API: {prefect_api}")
    print_line(f"MLflow tracking: {tracking_uri()}")
