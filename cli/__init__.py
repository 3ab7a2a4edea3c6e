"""The `deeprnn` command: typer commands that start the flows and print their results."""
