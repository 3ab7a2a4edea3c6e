"""The built wheel, installed where no checkout is: ``deeprnn`` is the only name it puts into site-packages,
``deeprnn run --preset smoke`` works from it, and the deployments of prefect.yaml, deployed from the checkout,
run on a process worker that has only the wheel (module-path entrypoints, ``deeprnn.flows.<module>:<flow>``).

The wheel is built from the files a source distribution holds (pyproject.toml, README.md, LICENSE, deeprnn/)
and installed without dependencies into a fresh virtual environment, which finds the dependencies in the test
environment's site-packages (added to its path, without the editable install's import hook)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from corpora import CORPUS_SHA1
from live_servers import WORKER_QUERY_SECONDS, Server, log_tail, start_process, stop_process_group
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POOL = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())["definitions"]["work_pools"]["process"]["name"]
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE")
RUN_TIMEOUT = 600.0


@dataclass(frozen=True)
class Installed:
    """A virtual environment with the wheel installed: its interpreter and its ``bin`` folder."""

    wheel: Path
    python: Path
    bin: Path


def _build_wheel(root: Path) -> Path:
    """``pip wheel`` of a copy of what a source distribution holds (the checkout itself stays clean)."""
    src = root / "src"
    src.mkdir()
    for name in SOURCE_FILES:
        shutil.copy2(PROJECT_ROOT / name, src / name)
    shutil.copytree(PROJECT_ROOT / "deeprnn", src / "deeprnn", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (root / "dist").glob("deeprnn-*.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, built and installed (``pip install --no-deps``) into a new virtual environment."""
    root = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    # The dependencies: the test environment's site-packages, after the venv's own (so its deeprnn comes
    # first). A path line adds the folder only: the editable install's .pth hook there is not run.
    (own,) = (p for p in venv.glob("lib/python*/site-packages"))
    (own / "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return Installed(wheel, python, venv / "bin")


def _env(root: Path, **extra: str) -> dict[str, str]:
    """An environment without the checkout: no PYTHONPATH, a fresh Prefect home, MLflow store and cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PREFECT_API_URL")}
    return {
        **env,
        "PREFECT_HOME": str(root / "prefect-home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "DEEPRNN_CACHE_DIR": str(root / "cache"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **extra,
    }


def test_the_wheel_installs_deeprnn_as_its_only_top_level_name(installed: Installed, tmp_path: Path) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert {name.split("/")[0] for name in names} == {
        "deeprnn",
        f"{installed.wheel.name.split('-')[0]}-0.1.0.dist-info",
    }
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(installed.wheel).read(top_level).decode().split() == ["deeprnn"]
    # Every layer is inside it, and nothing of the old top-level names is importable from the install.
    probe = (
        "import importlib, importlib.util, json, deeprnn;"
        "layers = ['deeprnn.cli.app', 'deeprnn.flows.train_flow', 'deeprnn.tasks.train_task', 'deeprnn.ops.failures',"
        " 'deeprnn.tracking.runs', 'deeprnn.data.vocab', 'deeprnn.training.loop', 'deeprnn.search.space'];"
        "[importlib.import_module(m) for m in layers];"
        "print(json.dumps({'file': deeprnn.__file__,"
        " 'others': [n for n in ('cli', 'flows', 'tasks', 'ops', 'tracking') if importlib.util.find_spec(n)]}))"
    )
    out = subprocess.run([str(installed.python), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    assert Path(found["file"]).is_relative_to(installed.python.parent.parent), found
    assert found["others"] == []


def test_deeprnn_run_smoke_works_from_the_wheel(installed: Installed, tmp_path: Path, book_url: str) -> None:
    out = tmp_path / "result.json"
    run = subprocess.run(
        [str(installed.bin / "deeprnn"), "run", "--preset", "smoke", "--device", "cpu"]
        + ["--data-url", book_url, "--json", str(out)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ERROR" not in run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["metrics"]["test_perplexity"] > 1 and result["samples"]
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["run_id"]).info.status == "FINISHED"


def _api(server: Server, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, server.url + path, timeout=30, **kwargs)


def _wait_for_final_state(server: Server, flow_run_id: str, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        run = _api(server, "GET", f"/flow_runs/{flow_run_id}").json()
        if run["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        time.sleep(2)
    pytest.fail(f"flow run {flow_run_id} not finished after {RUN_TIMEOUT:.0f} s; worker log:\n{log_tail(log)}")


def test_deployed_from_the_checkout_a_deployment_runs_on_a_worker_with_only_the_wheel(
    installed: Installed, prefect_server: Server, tmp_path: Path, book_url: str
) -> None:
    env = {k: v for k, v in prefect_server.env.items() if k != "PYTHONPATH"}

    def prefect(*args: str) -> subprocess.CompletedProcess:
        """``prefect ARGS`` of the wheel's environment, run in the checkout, as the README says."""
        return subprocess.run(
            [str(installed.python), "-m", "prefect", *args],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    pool = prefect("work-pool", "create", POOL, "--type", "process")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = prefect("--no-prompt", "deploy", "--all")
    assert deploy.returncode == 0, deploy.stdout[-4000:] + deploy.stderr[-4000:]
    deployments = {d["name"]: d for d in _api(prefect_server, "POST", "/deployments/filter", json={}).json()}
    assert deployments["smoke"]["entrypoint"] == "deeprnn.flows.train_flow:train_lm"

    # The worker's folder holds no code: its flow runs import deeprnn from the wheel's environment.
    folder = tmp_path / "worker"
    folder.mkdir()
    worker_env = _env(
        folder, PREFECT_API_URL=prefect_server.env["PREFECT_API_URL"], PREFECT_WORKER_QUERY_SECONDS=WORKER_QUERY_SECONDS
    )
    log = folder / "worker.log"
    worker = start_process(
        [str(installed.python), "-m", "prefect", "worker", "start", "--pool", POOL, "--name", "wheel-worker"],
        log,
        worker_env,
        cwd=folder,
    )
    try:
        params = {
            "train": {"epochs": 2, "device": "cpu"},
            "data": {"url": book_url, "sha1": CORPUS_SHA1},
            "runs_dir": str(folder / "runs"),
        }
        created = _api(
            prefect_server,
            "POST",
            f"/deployments/{deployments['smoke']['id']}/create_flow_run",
            json={"parameters": params},
        )
        assert created.status_code == 201, created.text
        run = _wait_for_final_state(prefect_server, created.json()["id"], log)
        assert run["state_type"] == "COMPLETED", log_tail(log)
    finally:
        stop_process_group(worker, first=signal.SIGINT, grace=20)
    client = MlflowClient(worker_env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    (mlflow_run,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["train.epochs"] == "2"
    assert (folder / "runs" / mlflow_run.info.run_id / "model.pt").is_file()
    assert not re.search(r"Traceback|ModuleNotFoundError", log.read_text())
