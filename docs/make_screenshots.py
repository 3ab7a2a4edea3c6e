"""Make the MLflow screenshots in docs/ again, with a real headless Chromium against real servers on 127.0.0.1.

Starts an ``mlflow server`` (sqlite store, local artifacts) in a temporary folder, trains three smoke models
that differ only in ``model.cell`` with ``deeprnn run`` (the book's corpus, read from ``--data``), then opens
the MLflow UI in Chromium (Playwright) and saves:

- ``docs/mlflow-models-ranking.png``: the experiment's *Models* tab: each logged model with its registered
  version, its dataset and its own ``test_perplexity`` (the UI lists them by creation time;
  ``mlflow.search_logged_models(order_by=...)`` ranks them);
- ``docs/mlflow-compare.png``: the runs' chart view filtered to ``perplexity`` (per-epoch curves of the
  three runs).

``--keep DIR`` keeps the folder (server store, runs) and reuses its runs on the next call.

Needs Chromium (Debian: ``apt-get install chromium``) and ``pip install playwright``; Playwright is pointed at
the system's Chromium and never downloads a browser.

    python docs/make_screenshots.py --data ../shared/data/timemachine.txt
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXPERIMENT = "compare-cells"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on a free port of 127.0.0.1; returns the process and its URL once /health answers."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=env,
        stdout=(root / "mlflow.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        if proc.poll() is not None:
            raise RuntimeError((root / "mlflow.log").read_text()[-3000:])
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("mlflow server did not answer in 240 s")


def train(root: Path, url: str, data: Path, cells: list[str]) -> None:
    """One ``deeprnn run --preset smoke --cell C`` per cell, side by side, all logging to the server."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "DEEPRNN_CACHE_DIR": str(root / "cache"),
        "PREFECT_HOME": str(root / "prefect"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("PREFECT_API_URL", None)
    procs = []
    for cell in cells:
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "run",
            "--preset",
            "smoke",
            "--cell",
            cell,
            "--epochs",
            "8",
            "--device",
            "cpu",
            "--data-url",
            str(data),
            "--experiment",
            EXPERIMENT,
            "--runs-dir",
            str(root / "runs"),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=root,
                env={**env, "PREFECT_HOME": str(root / f"prefect-{cell}")},
                stdout=(root / f"run-{cell}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
    for cell, proc in zip(cells, procs):
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"deeprnn run --cell {cell} failed:\n" + (root / f"run-{cell}.log").read_text()[-3000:])


def experiment_id(url: str) -> str:
    """The id of the experiment the runs went to."""
    found = requests.get(
        f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": EXPERIMENT}, timeout=30
    ).json()
    return found["experiment"]["experiment_id"]


def _close_assistant(page) -> None:  # type: ignore[no-untyped-def]
    """Close MLflow's assistant side panel when it is open (it covers the right of the page)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def shoot(url: str, exp: str, out: Path) -> list[Path]:
    """Open the Models tab and the runs' chart view in headless Chromium and save both screenshots."""
    from playwright.sync_api import sync_playwright

    saved = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1700, "height": 420})
        page.goto(f"{url}/#/experiments/{exp}/models?workflowType=machine_learning")
        page.get_by_text("Source run").first.wait_for(timeout=120_000)
        _close_assistant(page)
        page.get_by_text("test_perplexity").first.wait_for(timeout=60_000)  # the models' own metrics
        page.wait_for_timeout(1500)
        saved.append(out / "mlflow-models-ranking.png")
        page.screenshot(path=str(saved[-1]))

        page = browser.new_page(viewport={"width": 1500, "height": 800})
        page.goto(f"{url}/#/experiments/{exp}/runs?workflowType=machine_learning&compareRunsMode=CHART")
        search = page.get_by_placeholder("Search metric charts")
        search.wait_for(timeout=120_000)
        _close_assistant(page)
        search.fill("perplexity")
        page.get_by_text("heldout_perplexity").first.wait_for(timeout=60_000)
        page.wait_for_timeout(5000)  # charts draw after their data arrives
        saved.append(out / "mlflow-compare.png")
        page.screenshot(path=str(saved[-1]))
        browser.close()
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "timemachine.txt")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it; its runs are reused next time.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deeprnn-shots-") as tmp:
        root = args.keep.resolve() if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        trained = (root / "mlflow.db").exists()
        proc, url = start_mlflow(root)
        try:
            if not trained:
                train(root, url, args.data.resolve(), ["lstm", "gru", "rnn"])
            saved = shoot(url, experiment_id(url), args.out)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    print(json.dumps([str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in saved]))


if __name__ == "__main__":
    main()
