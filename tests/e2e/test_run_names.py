"""A run sized to its text is named for the model it trains: the MLflow run, its Prefect flow run and the tag
that links them all say the sized width, not the preset's, once the sizing stage has decided it."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import mlflow
import pytest
from prefect import get_client

from deeprnn.flows.train_flow import train_lm

pytestmark = pytest.mark.e2e


def test_a_run_sized_to_a_small_text_is_named_for_the_sized_model(workdir: Path) -> None:
    rng = random.Random(3)
    words = "Über die Brücke gingen die Mädchen und Jungen der Stadt . Die Straße war schön".split()
    corpus = workdir / "kurz.txt"  # about 20 KB: fewer tokens than the weights of 2 x 128, the smallest size
    corpus.write_text("".join(" ".join(rng.choices(words, k=10)) + "\n" for _ in range(350)), encoding="utf-8")

    engine_lines: list[logging.LogRecord] = []
    handler = _Collect(engine_lines)
    logging.getLogger("prefect.flow_runs").addHandler(handler)
    try:
        result = train_lm(
            data={"url": str(corpus)}, train={"device": "cpu", "time_budget": "1s"}, sample={"num_tokens": 5}
        )
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(handler)

    run = mlflow.get_run(result.run_id)
    params, tags = run.data.params, run.data.tags
    assert (params["model.num_layers"], params["model.num_hiddens"]) == ("2", "128")  # the preset says 256
    sha1 = hashlib.sha1(corpus.read_bytes()).hexdigest()
    name = f"text\u00b7kurz-{sha1[:8]}\u00b7lstm2x128"
    assert run.info.run_name == name and tags["prefect.flow_run_name"] == name
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(tags["prefect.flow_run_id"]).name == name
    # The engine's own last line ("Finished in state Completed()") says the new name too.
    finished = [r for r in engine_lines if "Finished in state" in r.getMessage()]
    assert finished and getattr(finished[-1], "flow_run_name", None) == name


class _Collect(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)
