"""The preparation flow: download -> tokenize once into the token cache -> report what it holds.

The same stage the training flow runs first, on its own: as a deployment it prepares a large corpus ahead
of the trainings that will use it (they then find it in the cache and tokenize nothing).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from deeprnn.config import resolve
from deeprnn.data.prepare import prepared_record
from deeprnn.flows.parameters import DataField, PresetField
from deeprnn.tasks.pipeline_tasks import download_corpus, prepare_tokens

FLOW_NAME = "deeprnn-prepare"


@flow(name=FLOW_NAME, log_prints=True)
def prepare_lm(preset: PresetField = "d2l-9.3", data: DataField = None) -> dict[str, Any]:
    """Download a corpus and tokenize it into the token cache (once per corpus and tokenization settings).

    Args:
        preset: Named configuration whose data settings to start from: d2l-9.3 (the book), full-book or smoke.
        data: Corpus, tokenization and split settings; the fields set replace the preset's. Empty: the preset's.
    """
    config = resolve(preset, data)
    corpus = download_corpus(config.data.url, config.data.expected_sha1())
    prepared = prepare_tokens(corpus, config.data)
    summary = prepared_record(prepared, config.data)
    shown = {**summary, **summary["splits"]}
    rows = "\n".join(f"| {key} | {value} |" for key, value in shown.items() if key != "splits")
    markdown = f"# deeprnn prepared corpus\n\n| | |\n| --- | --- |\n{rows}\n"
    create_markdown_artifact(markdown, key="deeprnn-prepare-summary")
    return summary
