"""Prefect tasks over the deeprnn library. Importing any of them keeps expected failures free of tracebacks in
Prefect's run logs (``deeprnn.ops.failures``)."""

from deeprnn.ops.failures import quiet_expected_failures

quiet_expected_failures()
