"""Prefect tasks over the deeprnn library. Importing any of them keeps expected failures free of tracebacks in
Prefect's run logs (``deeprnn.ops.failures``), and passwords of the tracking and storage URLs out of every log
record (``deeprnn.ops.password_scrub``): in the ``deeprnn`` command, in a deployment's flow run on a worker and
in a sweep's Dask workers alike."""

from deeprnn.ops.failures import quiet_expected_failures
from deeprnn.ops.password_scrub import scrub_log_handlers

quiet_expected_failures()
scrub_log_handlers()
