"""Operations around the flows: expected failures without tracebacks, the Prefect server's automations and
concurrency limits, zombie runs, Dask clusters for sweeps, the temporary Prefect API."""
