"""Passwords in database and tracking URLs stay out of everything deeprnn shows or keeps: a real PostgreSQL
server (password authentication over TCP on 127.0.0.1) holds the Optuna study and the Prefect server's
database, a real ``mlflow server`` is reached through ``http://user:password@...``, and after an adaptive
sweep from the command line no password appears in its output, its JSON, MLflow's params, tags, store and
artifacts, Prefect's flow-run parameters, logs and whole database, or a checkpoint. The dashboard's form
refuses a storage URL with its password written out; a Secret block supplies it instead."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from corpora import CORPUS_SHA1 as BOOK_SHA1
from live_servers import Server, free_port, start_process, stop_process_group, wait_until_healthy
from postgres_server import PostgresServer, needs_postgres, postgres_server

pytestmark = [pytest.mark.e2e, needs_postgres]

REPO = Path(__file__).resolve().parents[2]
# Distinct, unguessable passwords: a hit names the URL it came from.
STUDY_PW = f"study-{secrets.token_hex(6)}"
PREFECT_PW = f"prefect-{secrets.token_hex(6)}"
MLFLOW_PW = f"mlflow-{secrets.token_hex(6)}"
PASSWORDS = (STUDY_PW, PREFECT_PW, MLFLOW_PW)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """The Optuna study's database (user ``deeprnn``) and the Prefect server's (user ``prefect``), each with a
    password that TCP connections must give."""
    with postgres_server() as server:
        server.add_database("optuna", "deeprnn", STUDY_PW)
        server.add_database("prefect", "prefect", PREFECT_PW)
        yield server


@pytest.fixture(scope="module")
def prefect_on_postgres(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Server]:
    """``prefect server start`` whose database is PostgreSQL, reached with a password."""
    root = tmp_path_factory.mktemp("prefect-pg")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(root / "home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url("prefect", PREFECT_PW, "prefect", "asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    log = root / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_process(cmd, log, env, cwd=root)
    try:
        seconds = wait_until_healthy(f"http://127.0.0.1:{port}/api/health", proc, log)
        yield Server(f"http://127.0.0.1:{port}/api", root, env, log, seconds)
    finally:
        stop_process_group(proc)


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://tracker:{MLFLOW_PW}@", 1)


def _leaks(text: str) -> list[str]:
    return [pw for pw in PASSWORDS if pw in text]


def _files_leaks(folder: Path) -> dict[str, list[str]]:
    """Every file under ``folder`` whose bytes hold a password (databases, artifacts, logs)."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [pw for pw in PASSWORDS if pw.encode() in data]
            if hits:
                found[str(path.relative_to(folder))] = hits
    return found


def _prefect_records(api: str) -> dict[str, Any]:
    """The flow runs' parameters, every log line and every artifact on the Prefect server."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> dict[str, Any]:
        async with get_client() as client:
            flow_runs = await client.read_flow_runs()
            logs = await client.read_logs(limit=200)
            artifacts = await client.read_artifacts()
            task_runs = await client.read_task_runs()
        return {
            "parameters": {str(r.id): r.parameters for r in flow_runs},
            "states": [r.state.message for r in [*flow_runs, *task_runs] if r.state and r.state.message],
            "task_runs": [r.name for r in task_runs],
            "logs": [entry.message for entry in logs],
            "artifacts": [json.dumps(a.data, default=str) + (a.description or "") for a in artifacts],
        }

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(read())


def _checkpoint_leaks(runs_dir: Path) -> dict[str, list[str]]:
    """Every checkpoint under ``runs_dir`` whose loaded contents (or bytes) hold a password."""
    import torch

    found = {}
    for path in sorted(runs_dir.rglob("*.pt")):
        text = repr(torch.load(path, map_location="cpu", weights_only=False)) + repr(path.read_bytes())
        if _leaks(text):
            found[str(path)] = _leaks(text)
    return found


def test_adaptive_sweep_keeps_every_password_out_of_what_it_shows_and_keeps(
    tmp_path: Path, postgres: PostgresServer, prefect_on_postgres: Server, mlflow_server: Server, book_url: str
) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    storage = postgres.url("deeprnn", STUDY_PW, "optuna", "psycopg")
    env = {**os.environ, "PREFECT_API_URL": prefect_on_postgres.url, "PYTHONPATH": str(REPO)}
    env.update(MLFLOW_TRACKING_URI=_with_password(mlflow_server.url), DEEPRNN_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("DEEPRNN_OPTUNA_STORAGE", None)
    args = ["--lr", "2.0,0.01", "--param", "model.num_hiddens=16", "--param", "data.val_fraction=0.1"]
    args += ["--param", "train.max_steps=20", "--param", "train.eval_every_steps=10", "--epochs", "100"]
    args += ["--device", "cpu", "--data-url", book_url, "--data-sha1", BOOK_SHA1, "--max-trials", "2"]
    args += ["--workers", "1", "--study", "secret-study", "--storage", storage, "--experiment", "credentials"]
    command = [sys.executable, "-m", "deeprnn.cli.app", "sweep", "--search", "optuna", "--preset", "smoke", *args]
    proc = subprocess.run(
        [*command, "--json", "out.json"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert _leaks(output) == [] and _leaks((tmp_path / "out.json").read_text()) == []
    shown = f"deeprnn:***@127.0.0.1:{postgres.port}/optuna"
    assert shown in " ".join(proc.stdout.split())  # which database and user, the password masked
    # The study really lives in PostgreSQL, opened with the password.
    assert len(optuna.load_study(study_name="secret-study", storage=storage).trials) == 2

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("credentials")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and two trials
    for run in runs:
        assert _leaks(json.dumps([run.data.params, run.data.tags])) == [], run.info.run_id
    parent = next(r for r in runs if r.data.tags.get("deeprnn.sweep") == "true")
    assert parent.data.params["sweep.storage"].endswith(shown)
    assert _files_leaks(mlflow_server.root) == {}  # the store and every artifact, study.json and space.json too

    records = _prefect_records(prefect_on_postgres.url)
    assert [p["storage"] for p in records["parameters"].values() if "storage" in p] == [
        storage.replace(STUDY_PW, "***")
    ]
    assert records["logs"] and records["task_runs"]
    assert _leaks(json.dumps(records, default=str)) == []
    assert _leaks(postgres.dump("prefect")) == []  # flow and task runs, logs, artifacts, events: the whole database
    assert _leaks(prefect_on_postgres.log.read_text(errors="replace")) == []

    assert list((tmp_path / "runs").rglob("*.pt")) and _checkpoint_leaks(tmp_path / "runs") == {}


def test_form_refuses_a_written_out_password_and_a_secret_block_supplies_it(
    postgres: PostgresServer, prefect_on_postgres: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.callables import parameter_schema

    from deeprnn.flows.sweep_flow import sweep_lm
    from deeprnn.ops.study_storage import PASSWORD_REFUSED, study_storage
    from deeprnn.search.optuna_study import StudyError

    storage = postgres.url("deeprnn", STUDY_PW, "optuna", "psycopg")
    masked = storage.replace(STUDY_PW, "***")

    async def create_runs() -> tuple[list[str], int]:
        async with get_client() as client:
            flow_id = await client.create_flow_from_name(sweep_lm.name)
            schema = parameter_schema(sweep_lm).model_dump_for_openapi()
            deployment = await client.create_deployment(
                flow_id, "sweep-form", parameter_openapi_schema=schema, enforce_parameter_schema=True
            )
            refused = []
            for value in (storage, storage.replace("psycopg", "asyncpg")):
                try:
                    await client.create_flow_run_from_deployment(deployment, parameters={"space": {}, "storage": value})
                except PrefectHTTPStatusError as exc:
                    refused.append(str(exc.response.status_code))
            accepted = await client.create_flow_run_from_deployment(
                deployment, parameters={"space": {}, "storage": "secret:optuna-db"}
            )
            runs = await client.read_flow_runs()
            await client.delete_flow_run(accepted.id)
            return refused, sum(r.deployment_id == deployment for r in runs)

    with temporary_settings({PREFECT_API_URL: prefect_on_postgres.url}):
        refused, created = asyncio.run(create_runs())
        # The server refuses the run before it exists: nothing stored; the Secret block's name is accepted.
        assert refused == ["409", "409"] and created == 1
        Secret(value=storage).save("optuna-db", overwrite=True)
        assert study_storage("secret:optuna-db") == storage
        with pytest.raises(StudyError, match="no Prefect Secret block 'missing'"):
            study_storage("secret:missing")

    # Run without the form's check (the API's own, or a flow called directly): one line, the value not echoed.
    with pytest.raises(StudyError) as refusal:
        study_storage(storage)
    assert str(refusal.value) == PASSWORD_REFUSED and STUDY_PW not in str(refusal.value)
    # A masked URL is read from the worker's environment, and only when that holds the same URL.
    monkeypatch.setenv("DEEPRNN_OPTUNA_STORAGE", storage)
    assert study_storage(masked) == storage and study_storage(None) == storage
    monkeypatch.setenv("DEEPRNN_OPTUNA_STORAGE", storage.replace("optuna", "other"))
    with pytest.raises(StudyError, match="does not hold that URL"):
        study_storage(masked)
