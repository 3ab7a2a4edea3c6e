"""The MLflow adapter: the only package that talks to MLflow (it never imports Prefect).

Import the module for the concern at hand, e.g. ``from tracking import runs`` and ``runs.start_run(...)``:

- ``deeprnn.tracking.store``: the tracking URI, reachability, the store's set-up and schema check, experiment ids,
  the URI for other processes, and ``retry_on_io_faults`` (which faults a Prefect retry may get past).
- ``deeprnn.tracking.runs``: create/find/reopen/end runs, Ctrl-C handling, params, tags, datasets, artifacts, lookups
  and UI links.
- ``deeprnn.tracking.metrics``: ``MetricLogger`` (batched curves), final metrics, epoch histories, system metrics.
- ``deeprnn.tracking.model_registry``: the logged model, the registry, champion promotion, fetching and loading models.
- ``deeprnn.tracking.lm_pyfunc``: the pyfunc model code MLflow loads with a logged model.
"""
