"""``deeprnn setup-server``: prepare a Prefect server for runs nobody watches."""

from __future__ import annotations

from typing import Optional

import typer

from deeprnn.cli.output import console, fail


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
        fail("--alert-webhook must be an http:// or https:// URL")
    from prefect.exceptions import ObjectNotFound

    from deeprnn.ops.automations import POOL
    from deeprnn.ops.automations import setup_server as setup

    try:
        done = setup(training_slots, alert_webhook, allow_private_urls, zombie_after)
    except ObjectNotFound:
        fail(f"no work pool {POOL!r} on the server: prefect work-pool create {POOL} --type process", 1)
    for line in done:
        console.print(line, highlight=False, soft_wrap=True)
