"""Prefect tasks over the deeprnn library. Importing any of them keeps expected failures free of tracebacks in
Prefect's run logs (``ops.failures``)."""

from ops.failures import quiet_expected_failures

quiet_expected_failures()
