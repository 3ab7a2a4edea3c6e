"""A team's stack for the end-to-end tests: ``scripts/team_stack.py`` brought up in a temporary folder (real
PostgreSQL, Prefect and MLflow servers on it, two process workers in empty folders, every deployment of
prefect.yaml deployed), and helpers to run deployments on it.

A test module uses it by importing the fixture (pytest finds fixtures in the module's namespace)::

    from team_stack_fixture import stack_script, team_stack, run_deployment, wait_for_flow_run

Each module that imports ``team_stack`` gets its own stack (module scope): bringing it up is the costly part, so
one module (tests/e2e/test_team_stack.py) holds every test of it, the disruptive ones (a PostgreSQL restart, the
MLflow server stopped, a worker killed) after the ones they would break.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from live_servers import WORKER_QUERY_SECONDS

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2  # enough to stop a run on one and resume it on the other
RUN_TIMEOUT = 600.0  # seconds for a smoke run to reach a final state, on a loaded machine too
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _load_script() -> Any:
    """scripts/team_stack.py as the module ``team_stack`` (scripts/ is no package)."""
    if "team_stack" in sys.modules:
        return sys.modules["team_stack"]
    spec = importlib.util.spec_from_file_location("team_stack", PROJECT_ROOT / "scripts" / "team_stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["team_stack"] = module  # before running it: its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


stack_script = _load_script()


@pytest.fixture(scope="module")
def team_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``team_stack.py up --workers 2 --deploy --no-scheduler`` in a fresh folder; ``down --purge`` at the end.

    Yields the ``Stack`` (``stack.team_env()``, ``stack.prefect_api_url``, ``stack.mlflow_url``,
    ``stack.database_url(name)``, ``stack.workers``, ``stack.root``). The scheduler service is off, so no
    nightly schedule starts a long run on the workers mid-test.
    """
    try:
        stack_script.find_postgres()
    except stack_script.StackError as error:
        pytest.skip(str(error))
    root = tmp_path_factory.mktemp("team-stack")
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        # One torch thread per flow run: the workers' runs share the test machine's cores with each other and
        # with the rest of the suite, and oversubscribed OpenMP threads slow every run down many times over.
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)
        try:
            stack = stack_script.up(root, workers=WORKERS, deploy_all=True, scheduler=False)
        except stack_script.StackError as error:
            pytest.fail(f"team_stack up failed: {error}")
        stack.startup_seconds = time.monotonic() - started
        try:
            yield stack
        finally:
            stack_script.down(root, purge=True)


def prefect_api(stack: Any, method: str, path: str, **kwargs: Any) -> requests.Response:
    """One call to the stack's Prefect REST API (``path`` after /api)."""
    return requests.request(method, stack.prefect_api_url + path, timeout=30, **kwargs)


def run_deployment(stack: Any, name: str, parameters: dict[str, Any]) -> str:
    """Create a run of deployment ``flow/name`` (e.g. ``deeprnn-train/smoke``) with ``parameters``; its id."""
    flow, deployment = name.split("/")
    found = prefect_api(stack, "GET", f"/deployments/name/{flow}/{deployment}")
    assert found.status_code == 200, found.text
    created = prefect_api(
        stack, "POST", f"/deployments/{found.json()['id']}/create_flow_run", json={"parameters": parameters}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


def worker_logs(stack: Any) -> str:
    """The end of every worker's log, for failure messages."""
    return "\n".join(f"--- {n}:\n{stack.log(n).read_text(errors='replace')[-3000:]}" for n in stack.workers)


def wait_for_flow_run(stack: Any, flow_run_id: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Poll a flow run until it is Completed, Failed, Crashed or Cancelled; fail with the workers' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = prefect_api(stack, "GET", f"/flow_runs/{flow_run_id}").json()
        if run["state_type"] in FINAL_STATES:
            return run
        time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} not finished after {timeout:.0f} s:\n{worker_logs(stack)}")
