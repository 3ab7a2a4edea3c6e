"""What a Prefect server needs so that nobody has to watch it: one training at a time per GPU worker, zombie flow
runs marked Crashed, and a notification for every failed or crashed run. ``deeprnn setup-server`` calls
``setup_server``; it is safe to run again (it updates what it made before).

- Training slots: the training deployments (``prefect.yaml``) share the work queue ``training`` of the pool;
  its concurrency limit (default 1: one worker with one GPU) makes further runs wait, Scheduled, for a slot.
- Zombies: deployment runs send a heartbeat every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (30, set in the
  pool's job variables); a run whose heartbeats stop for ``zombie_after`` seconds (its machine died, or its
  process was killed with the worker) is marked Crashed, as Prefect's "detect zombie flows" guide does. The
  ``mark-crashed`` deployment then marks its MLflow runs FAILED (``deeprnn/flows/crashed_flow.py``).
- Alerts: a webhook block (``deeprnn-alerts``) that posts the run's name, state and message to your URL,
  sent for every Failed or Crashed run of the training, evaluation and sweep flows.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound

POOL = "deeprnn-process"
TRAINING_QUEUE = "training"
ALERT_BLOCK = "deeprnn-alerts"
ZOMBIE_AUTOMATION = "deeprnn-crash-zombie-flow-runs"
ALERT_AUTOMATION = "deeprnn-alert-on-failure"
WATCHED_FLOWS = ["deeprnn-train", "deeprnn-evaluate", "deeprnn-sweep"]
ZOMBIE_AFTER = 90  # three missed heartbeats
FLOW_RUNS = ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]})
ENDED_BADLY = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
WATCHED = ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": WATCHED_FLOWS})

ALERT_JSON = {"subject": "{{subject}}", "text": "{{body}}"}  # what the webhook block posts
ALERT_SUBJECT = "deeprnn: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
ALERT_BODY = (
    "Flow run {{ flow_run.name }} of {{ flow.name }}"
    "{% if deployment %} (deployment {{ deployment.name }}){% endif %} ended {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}"
)


def zombie_automation(zombie_after: int = ZOMBIE_AFTER) -> AutomationCore:
    """Mark a flow run Crashed when it has sent no event for ``zombie_after`` seconds after a heartbeat."""
    crash = ChangeFlowRunState(
        state=StateType.CRASHED, message=f"no heartbeat for {zombie_after} s: the flow run's process or machine is gone"
    )
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="Deployment runs whose heartbeats stopped (machine lost, process killed) are marked Crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=FLOW_RUNS,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            within=timedelta(seconds=zombie_after),
        ),
        actions=[crash],
    )


def alert_automation(url: str, allow_private_urls: bool = False) -> AutomationCore:
    """Notify when a training, evaluation or sweep flow run fails or crashes, through the webhook block
    ``deeprnn-alerts``, created or updated here: it posts ``{"subject": ..., "text": ...}`` to ``url``.
    ``allow_private_urls`` lets it post to a host on a private network or this machine (Prefect refuses those by
    default)."""
    block = CustomWebhookNotificationBlock(
        name="deeprnn alerts", url=url, json_data=ALERT_JSON, allow_private_urls=allow_private_urls
    )
    notify = SendNotification(
        block_document_id=block.save(ALERT_BLOCK, overwrite=True), subject=ALERT_SUBJECT, body=ALERT_BODY
    )
    return AutomationCore(
        name=ALERT_AUTOMATION,
        description="Post every Failed or Crashed deeprnn flow run to the deeprnn-alerts webhook.",
        trigger=EventTrigger(expect=ENDED_BADLY, match=FLOW_RUNS, match_related=WATCHED),
        actions=[notify],
    )


def _replace_automation(client: Any, automation: AutomationCore) -> Any:
    for existing in client.read_automations_by_name(automation.name):
        client.delete_automation(existing.id)
    return client.create_automation(automation)


def setup_server(
    training_slots: int = 1,
    alert_webhook: str | None = None,
    allow_private_urls: bool = False,
    zombie_after: int = ZOMBIE_AFTER,
) -> list[str]:
    """Set up the Prefect server in ``PREFECT_API_URL`` for unattended runs; returns what it did, one line each.
    The work pool must exist (``prefect work-pool create deeprnn-process --type process``)."""
    done = []
    with get_client(sync_client=True) as client:
        client.read_work_pool(POOL)  # ObjectNotFound, said clearly by the command, when it is not there
        try:  # the training work queue's concurrency limit, the queue created when needed
            queue = client.read_work_queue_by_name(TRAINING_QUEUE, work_pool_name=POOL)
            client.update_work_queue(queue.id, concurrency_limit=training_slots)
        except ObjectNotFound:
            client.create_work_queue(TRAINING_QUEUE, work_pool_name=POOL, concurrency_limit=training_slots)
        done.append(f"work queue {POOL}/{TRAINING_QUEUE}: {training_slots} training run(s) at a time")
        _replace_automation(client, zombie_automation(zombie_after))
        done.append(f"automation {ZOMBIE_AUTOMATION}: runs without a heartbeat for {zombie_after} s are marked Crashed")
        if alert_webhook:
            _replace_automation(client, alert_automation(alert_webhook, allow_private_urls))
            done.append(
                f"automation {ALERT_AUTOMATION}: Failed or Crashed runs of {', '.join(WATCHED_FLOWS)} "
                f"are posted to the webhook block {ALERT_BLOCK}"
            )
    return done
