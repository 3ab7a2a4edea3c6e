"""The flow that closes the MLflow runs of a crashed flow run: the ``mark-crashed`` deployment in
``prefect.yaml`` runs it for every training, evaluation or sweep flow run that Prefect marks Crashed (its
process was killed, its machine lost, or its heartbeats stopped). A crashed process never ends its MLflow runs
itself: they would stay RUNNING forever. They are marked FAILED, with the reason as ``deeprnn.failure_reason``,
and stay resumable with ``deeprnn run --resume RUN_ID``."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_client, get_run_logger

from deeprnn.flows.evaluate_flow import FLOW_RUN_ID_PATTERN
from deeprnn.flows.parameters import form_field
from deeprnn.ops.orphans import mark_crashed_flow_run

FLOW_NAME = "deeprnn-mark-crashed"


@flow(name=FLOW_NAME, log_prints=True)
def mark_crashed(
    flow_run_id: Annotated[str, form_field("Crashed flow run", pattern=FLOW_RUN_ID_PATTERN)],
) -> dict[str, Any]:
    """Mark the MLflow runs still RUNNING that the crashed Prefect flow run ``flow_run_id`` opened FAILED.

    Args:
        flow_run_id: The crashed flow run's id (the deployment's trigger passes it).
    """
    with get_client(sync_client=True) as client:
        crashed = client.read_flow_run(flow_run_id)
    message = (crashed.state.message if crashed.state else None) or "no message"
    reason = f"Prefect flow run {crashed.name} crashed: {message}"
    marked = mark_crashed_flow_run(flow_run_id, reason)
    get_run_logger().info("MLflow runs marked FAILED: %s (%s)", ", ".join(marked) or "none", reason)
    return {"flow_run_id": flow_run_id, "marked_failed": marked, "reason": reason}
