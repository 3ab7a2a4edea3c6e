"""The ``deeprnn`` command: typer commands that validate their input, start the flows and print the results.

``app`` (the command and its registry), ``options`` (one ``--option`` per configuration field), ``launch``
(Prefect's temporary API, preloading, running a flow), ``output`` (tables, errors, JSON), and one module per
group of commands: ``run`` (run, prepare), ``sweep``, ``models`` (generate, presets), ``server`` (setup-server).
"""

import os

# Library log records (download, training) go to Prefect's handlers too; must be set before Prefect loads.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "deeprnn")
# The ephemeral API's default 20 s start-up budget is tight on a busy 2-core machine; waiting longer is cheap.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# MLflow draws a progress bar for every artifact download (the model an evaluation loads, a checkpoint to resume
# from): noise between the command's own lines. A user who wants it sets the variable to true.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
