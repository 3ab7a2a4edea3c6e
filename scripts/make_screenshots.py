"""Make every screenshot in docs/ again, with a real headless Chromium against real servers on 127.0.0.1.

Starts an ``mlflow server`` (sqlite store, local artifacts) and a ``prefect server`` (its own PREFECT_HOME,
dashboard on) in a temporary folder, trains three smoke models that differ only in ``model.cell`` with
``deeprnn run`` and a two-trial ``deeprnn sweep`` (the book's corpus, read from ``--data``), creates the
``deeprnn-process`` work pool and deploys ``prefect.yaml``, then opens both UIs in Chromium (Playwright) and
saves:

- ``docs/mlflow-models.png``: the experiment's *Models* tab: each logged model with its registered version,
  its dataset and its own ``test_perplexity`` (the MLflow 3.17 UI lists them by creation time only);
- ``docs/mlflow-models-ranking.png``: the runs table sorted by ``test_perplexity`` (best first, checked against
  ``search_logged_models(order_by=...)``), each run with its ``model.cell`` and registered model version;
- ``docs/mlflow-compare.png``: the runs' chart view filtered to ``perplexity`` (per-epoch curves of the
  three runs);
- ``docs/mlflow-sweep.png``: the sweep's runs table, the parent run expanded over its child runs;
- ``docs/prefect-run-form.png``: Deployments > smoke > Run > Custom run, the Training section overridden
  with ``epochs`` set to 2.

Both servers are stopped at the end, also when a step fails. ``--keep DIR`` keeps the folder (stores, runs)
and reuses its runs on the next call.

Needs Chromium (Debian: ``apt-get install chromium``) and ``pip install -e ".[docs]"`` (Playwright); Playwright
is pointed at the system's Chromium (``CHROMIUM`` overrides its path) and never downloads a browser.

    python scripts/make_screenshots.py --data ../shared/data/timemachine.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from ports import free_port  # noqa: E402  # the tests' own helper, one copy

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXPERIMENT = "compare-cells"
SWEEP_EXPERIMENT = "sweep-cells"
START_TIMEOUT = 240.0  # a fresh server answers in ~15 s on an idle 2-core machine
ML = "workflowType=machine_learning"  # the MLflow 3 UI's model-training view (it opens in its GenAI view)


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file, for error messages."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@contextlib.contextmanager
def server(cmd: list[str], health: str, log: Path, env: dict[str, str], cwd: Path) -> Iterator[None]:
    """Run ``cmd`` in its own process group until ``health`` answers 200; stop the whole group on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} server exited with {proc.returncode}:\n{log_tail(log)}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(health, timeout=2).status_code == 200:
                    break
            if time.monotonic() - started > START_TIMEOUT:
                raise RuntimeError(f"no answer from {health} after {START_TIMEOUT:.0f} s:\n{log_tail(log)}")
            time.sleep(0.5)
        yield
    finally:
        # SIGTERM, then SIGKILL for what is left of the group (uvicorn workers, services).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def mlflow_server(root: Path) -> tuple[contextlib.AbstractContextManager[None], str]:
    """``mlflow server`` on a free port of 127.0.0.1 (store and artifacts in ``root``) and its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    return server(cmd, f"{url}/health", root / "mlflow.log", env, root), url


def prefect_env(root: Path, port: int) -> dict[str, str]:
    """The environment of a Prefect server with its own home in ``root``, and of the clients that reach it."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "prefect-server"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Deployments keep their schedules, but no run is created from them while the pictures are taken.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true",
    }
    return env


def prefect_server(root: Path) -> tuple[contextlib.AbstractContextManager[None], str, dict[str, str]]:
    """``prefect server start`` (dashboard on) on a free port of 127.0.0.1; its URL and its clients' env."""
    port = free_port()
    env = prefect_env(root, port)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return server(cmd, f"{url}/api/health", root / "prefect.log", env, root), url, env


def run_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_all(procs: dict[str, tuple[subprocess.Popen[bytes], Path]], timeout: float = 1800) -> None:
    """Wait for every process; fail with the log of the first that did not succeed, ending the others."""
    try:
        for name, (proc, log) in procs.items():
            if proc.wait(timeout=timeout) != 0:
                raise RuntimeError(f"{name} failed:\n{log_tail(log)}")
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


def train(root: Path, url: str, data: Path, prefect_api: str | None) -> None:
    """Three ``deeprnn run --preset smoke --cell C`` and a two-trial ``deeprnn sweep``, all logging to ``url``.

    Their flows run against ``prefect_api`` (the Prefect server started here), else each command starts
    Prefect's temporary server, which can take minutes on a busy machine.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "DEEPRNN_CACHE_DIR": str(root / "cache")}
    env["PYTHONPATH"] = str(REPO)
    env.pop("PREFECT_API_URL", None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "600"
    common = ["--preset", "smoke", "--device", "cpu", "--data-url", str(data)]
    procs = {}
    for cell in ["lstm", "gru", "rnn"]:
        cmd = [sys.executable, "-m", "deeprnn.cli.app", "run", *common, "--cell", cell, "--epochs", "8"]
        cmd += ["--experiment", EXPERIMENT, "--runs-dir", str(root / "runs")]
        log = root / f"run-{cell}.log"
        procs[f"deeprnn run --cell {cell}"] = (
            run_logged(cmd, log, {**env, "PREFECT_HOME": str(root / f"prefect-{cell}")}, root),
            log,
        )
    wait_all(procs)
    cmd = [sys.executable, "-m", "deeprnn.cli.app", "sweep", *common, "--cell", "lstm,gru", "--epochs", "4"]
    cmd += ["--workers", "1", "--experiment", SWEEP_EXPERIMENT, "--runs-dir", str(root / "runs-sweep")]
    cmd += ["--no-register-best"]
    log = root / "sweep.log"
    wait_all({"deeprnn sweep": (run_logged(cmd, log, {**env, "PREFECT_HOME": str(root / "prefect-sweep")}, root), log)})


def deploy(env: dict[str, str]) -> None:
    """The README's steps: the ``deeprnn-process`` work pool, then ``prefect --no-prompt deploy --all``."""
    prefect = [sys.executable, "-m", "prefect"]
    env = {**env, "PYTHONPATH": str(REPO)}
    steps = [[*prefect, "work-pool", "create", "deeprnn-process", "--type", "process", "--overwrite"]]
    steps.append([*prefect, "--no-prompt", "deploy", "--all"])
    for cmd in steps:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def experiment_id(url: str, name: str) -> str:
    """The id of the MLflow experiment called ``name``."""
    found = requests.get(
        f"{url}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name}, timeout=30
    ).json()
    return str(found["experiment"]["experiment_id"])


def ranked_run_names(url: str, exp: str) -> list[str]:
    """The source runs' names of the experiment's logged models, lowest ``test_perplexity`` first (REST API).

    The Models tab shows every model as ``model``; the source run's name tells the rows apart.
    """
    body = {"experiment_ids": [exp], "order_by": [{"field_name": "metrics.test_perplexity", "ascending": True}]}
    found = requests.post(f"{url}/api/2.0/mlflow/logged-models/search", json=body, timeout=30).json()
    names = []
    for model in found["models"]:
        run = requests.get(
            f"{url}/api/2.0/mlflow/runs/get", params={"run_id": model["info"]["source_run_id"]}, timeout=30
        ).json()
        names.append(str(run["run"]["info"]["run_name"]))
    return names


def _close_assistant(page: Any) -> None:
    """Close MLflow's assistant side panel when it is open (it covers the right of the page)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def shoot_models(browser: Any, url: str, exp: str, path: Path) -> None:
    """The Models tab: each logged model with its registered version, dataset and its own metrics.

    The MLflow 3.17 UI lists logged models by creation time only (its sort by metric columns is switched off),
    so this picture lists them; ``mlflow-models-ranking.png`` ranks them.
    """
    page = browser.new_page(viewport={"width": 2050, "height": 420})  # wide enough for the metric columns
    page.goto(f"{url}/#/experiments/{exp}/models?{ML}")
    page.get_by_text("Source run").first.wait_for(timeout=120_000)
    _close_assistant(page)
    page.get_by_role("columnheader", name=re.compile("test_perplexity")).first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(path))


def shoot_ranking(browser: Any, url: str, exp: str, path: Path) -> None:
    """The runs table sorted by ``test_perplexity``, lowest first, with each run's registered model version.

    Sorted through the URL's ``orderByKey``/``orderByAsc`` (the UI's own sort state), then checked against the
    order ``mlflow.search_logged_models(order_by=metrics.test_perplexity)`` returns.
    """
    page = browser.new_page(viewport={"width": 1700, "height": 420})
    page.goto(f"{url}/#/experiments/{exp}/runs?{ML}&orderByKey=metrics.%60test_perplexity%60&orderByAsc=true")
    page.get_by_role("columnheader", name="Models").first.wait_for(timeout=120_000)
    _close_assistant(page)
    show_columns(page, ["model.cell", "test_perplexity"])
    ranked = ranked_run_names(url, exp)
    if listed_order(page, ranked) != ranked:
        raise RuntimeError(f"the runs table does not list {ranked} in this order when sorted by test_perplexity")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(path))


def show_columns(page: Any, names: list[str]) -> None:
    """Add these params or metrics as columns of the runs table, through its *Columns* menu."""
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_role("textbox", name="Search columns")
    for name in names:
        search.fill(name)
        # The whole title must be `name`: the search also lists best_test_perplexity for test_perplexity.
        page.get_by_role("dialog").locator("span").filter(has_text=re.compile(rf"^{re.escape(name)}$")).last.click()
        page.wait_for_timeout(500)
    page.keyboard.press("Escape")
    for name in names:
        page.get_by_role("columnheader", name=name, exact=True).first.wait_for(timeout=30_000)
    page.get_by_text("matching runs").first.click()  # focus and pointer off the menu and the cells (no tooltip)
    page.wait_for_timeout(1000)


def listed_order(page: Any, names: list[str]) -> list[str]:
    """``names`` in the order in which the page's table rows show them."""
    rows = [page.get_by_role("row").nth(i).inner_text() for i in range(page.get_by_role("row").count())]
    return [name for row in rows for name in names if name in row.split("\n")]


def shoot_compare(browser: Any, url: str, exp: str, path: Path) -> None:
    """The runs' chart view, charts filtered to the perplexity metrics."""
    page = browser.new_page(viewport={"width": 1500, "height": 800})
    page.goto(f"{url}/#/experiments/{exp}/runs?{ML}&compareRunsMode=CHART")
    search = page.get_by_placeholder("Search metric charts")
    search.wait_for(timeout=120_000)
    _close_assistant(page)
    search.fill("perplexity")
    page.get_by_text("heldout_perplexity").first.wait_for(timeout=60_000)
    page.wait_for_timeout(5000)  # charts draw after their data arrives
    page.screenshot(path=str(path))


def shoot_sweep(browser: Any, url: str, exp: str, path: Path) -> None:
    """The sweep's runs table, its parent run expanded over its trials, with their cell and test perplexity."""
    parent = sweep_parent_name(url, exp)
    page = browser.new_page(viewport={"width": 1700, "height": 460})
    page.goto(f"{url}/#/experiments/{exp}/runs?{ML}")  # sorted by creation: a metric sort flattens the tree
    cell = page.get_by_role("gridcell").filter(has=page.get_by_role("link", name=parent, exact=True))
    cell.first.wait_for(timeout=120_000)
    _close_assistant(page)
    trials = page.get_by_role("link", name=re.compile(r"^trial-\d"))
    if not trials.count():
        cell.first.get_by_role("button").first.click()  # the expander beside the parent's name
    trials.first.wait_for(timeout=60_000)
    show_columns(page, ["model.cell", "test_perplexity", "best_test_perplexity"])
    page.screenshot(path=str(path))


def sweep_parent_name(url: str, exp: str) -> str:
    """The name of the sweep's parent run (the run tagged ``deeprnn.sweep``; its trials are nested under it)."""
    body = {"experiment_ids": [exp], "filter": "tags.`deeprnn.sweep` = 'true'", "max_results": 1}
    runs = requests.post(f"{url}/api/2.0/mlflow/runs/search", json=body, timeout=30).json().get("runs", [])
    if not runs:
        raise RuntimeError(f"no sweep parent run in MLflow experiment {exp}")
    return str(runs[0]["info"]["run_name"])


def shoot_run_form(browser: Any, url: str, path: Path) -> None:
    """Deployments > d2l-9.3 > Run > Custom run: the form pre-filled with the preset's values, its Training
    section (500 epochs, lr 2) at the top of the picture; found by role and text only."""
    page = browser.new_page(viewport={"width": 1400, "height": 1330})
    page.goto(f"{url}/deployments")
    page.get_by_role("link", name="d2l-9.3", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.get_by_text("Parameters", exact=True).first.wait_for(timeout=60_000)
    epochs = page.get_by_text(re.compile(r"^\s*Epochs(\s*\(Optional\))?\s*$")).first
    epochs.wait_for(timeout=60_000)  # the form draws its fields after the deployment's schema arrives
    training = page.get_by_text(re.compile(r"^\s*Training(\s*\(Optional\))?\s*$")).first
    training.evaluate("element => element.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(path))


def shoot_all(mlflow_url: str, prefect_url: str | None, out: Path) -> list[Path]:
    """Take every picture; returns the files written."""
    from playwright.sync_api import sync_playwright

    saved = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=CHROMIUM_ARGS
        )
        try:
            exp = experiment_id(mlflow_url, EXPERIMENT)
            pictures = [
                ("mlflow-models.png", shoot_models),
                ("mlflow-models-ranking.png", shoot_ranking),
                ("mlflow-compare.png", shoot_compare),
            ]
            for name, shoot in pictures:
                shoot(browser, mlflow_url, exp, out / name)
                saved.append(out / name)
            shoot_sweep(browser, mlflow_url, experiment_id(mlflow_url, SWEEP_EXPERIMENT), out / "mlflow-sweep.png")
            saved.append(out / "mlflow-sweep.png")
            if prefect_url:
                shoot_run_form(browser, prefect_url, out / "prefect-run-form.png")
                saved.append(out / "prefect-run-form.png")
        finally:
            browser.close()
    return saved


def main() -> None:
    """Start the servers, train, deploy, take the pictures, stop the servers."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "timemachine.txt")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it; its runs are reused next time.")
    parser.add_argument("--no-prefect", action="store_true", help="Only the MLflow pictures.")
    args = parser.parse_args()
    if not args.data.is_file():
        parser.error(f"no corpus at {args.data}: pass --data PATH to a text file (the book's timemachine.txt)")
    with tempfile.TemporaryDirectory(prefix="deeprnn-shots-") as tmp, contextlib.ExitStack() as stack:
        root = args.keep.resolve() if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        trained = (root / "trained").exists()  # written once every run of an earlier call succeeded
        mlflow, mlflow_url = mlflow_server(root)
        stack.enter_context(mlflow)
        prefect_url = None
        if not args.no_prefect:
            prefect, prefect_url, env = prefect_server(root)
            stack.enter_context(prefect)
            deploy(env)
        if not trained:
            train(root, mlflow_url, args.data.resolve(), prefect_url and f"{prefect_url}/api")
            (root / "trained").touch()
        saved = shoot_all(mlflow_url, prefect_url, args.out.resolve())
    print(json.dumps([str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p) for p in saved]))


if __name__ == "__main__":
    main()
