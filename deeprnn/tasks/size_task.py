"""The sizing stage as a Prefect task: the configuration sized to the prepared text (the ``text`` preset's
model size and batch shape, sample prefixes drawn from the held-out text), logged to MLflow once decided."""

from __future__ import annotations

import logging

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from deeprnn.config import RunConfig
from deeprnn.data.prepare import PreparedCorpus
from deeprnn.sizing import decided_later, size_to_text
from deeprnn.tracking import naming, runs


@task(name="size-to-text", cache_policy=NO_CACHE)
def size_configuration(
    config: RunConfig,
    prepared: PreparedCorpus,
    run_id: str,
    device: torch.device,
    corpus_source: str | None = None,
) -> RunConfig:
    """Decide what the configuration leaves to the text (``model.size = "auto"``, empty prefixes), say what
    was chosen and why, and log the decided values as the run's params; with ``corpus_source``, name the run
    (the MLflow run and the Prefect flow run it belongs to) after the sized model. Other configurations pass
    unchanged."""
    later = decided_later(config)
    if not later:
        return config
    ids = torch.from_numpy(prepared.ids())
    sized = size_to_text(config, ids, prepared.vocab(), device, prepared.corpus_sha1)
    logger = get_run_logger()
    for note in sized.notes:
        logger.info(note)
    flat = sized.config.flat()
    runs.log_params(run_id, {key: flat[key] for key in sorted(later)})
    if corpus_source is not None:
        name = naming.run_name(sized.config, naming.corpus_stem(corpus_source), prepared.corpus_sha1)
        tags = {"mlflow.runName": name}
        if _rename_flow_run(name):
            tags["prefect.flow_run_name"] = name
        runs.set_tags(run_id, tags)
        logger.info(f"run named for the sized model: {name}")
    return sized.config


def _rename_flow_run(name: str) -> bool:
    """Rename the flow run this task runs in (in the API and in this process); False outside a flow run."""
    from prefect import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return False
    with get_client(sync_client=True) as client:
        client.set_flow_run_name(context.flow_run.id, name)
    context.flow_run.name = name  # what prefect.runtime.flow_run.get_name() answers from now on
    _RENAMED.names[str(context.flow_run.id)] = name
    return True


class _RenamedFlowRuns(logging.Filter):
    """The new name on the flow-run engine's own log lines (``Finished in state ...``): its logger keeps the
    name the flow run started with."""

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[str, str] = {}  # flow run id -> its name since sizing

    def filter(self, record: logging.LogRecord) -> bool:
        """Rename, never drop."""
        name = self.names.get(str(getattr(record, "flow_run_id", "")))
        if name is not None:
            record.flow_run_name = name
        return True


_RENAMED = _RenamedFlowRuns()
logging.getLogger("prefect.flow_runs").addFilter(_RENAMED)
