"""The team's stack is declared three times: scripts/team_stack.py (run by the e2e tests), compose.yaml (run by
no test: no Docker engine in CI) and docs/team-stack.md. These checks keep them saying the same thing: the
databases, the services, the servers' flags and drivers, the work pool and the drivers the `postgres` extra
installs. Fast: nothing starts."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOC = (ROOT / "docs" / "team-stack.md").read_text()


def _script() -> ModuleType:
    if "team_stack" in sys.modules:
        return sys.modules["team_stack"]
    spec = importlib.util.spec_from_file_location("team_stack", ROOT / "scripts" / "team_stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["team_stack"] = module
    spec.loader.exec_module(module)
    return module


ts = _script()


def command(service: str) -> str:
    """A service's command as one string."""
    value = SERVICES[service]["command"]
    return value if isinstance(value, str) else " ".join(value)


def test_compose_has_the_scripts_services_and_a_deploy_step() -> None:
    assert set(SERVICES) == {*ts.COMPONENTS, "deploy"}
    assert SERVICES["postgres"]["image"].startswith("postgres:")
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_the_same_three_databases_everywhere() -> None:
    init = COMPOSE["configs"]["create-databases"]["content"]
    created = re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", init)
    assert created == [(name, ts.ROLE) for name in ts.DATABASES]
    assert ts.DATABASES == ("prefect", "mlflow", "optuna")
    environments = {**SERVICES["prefect"]["environment"], **SERVICES["mlflow"]["environment"]}
    worker_env = SERVICES["worker"]["environment"]
    assert environments["PREFECT_API_DATABASE_CONNECTION_URL"].endswith("@postgres:5432/prefect")
    assert environments["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert worker_env["DEEPRNN_OPTUNA_STORAGE"].endswith("@postgres:5432/optuna")
    for name in ts.DATABASES:
        assert f"`{name}`" in DOC


def test_servers_use_the_same_drivers_as_the_script_and_the_extra() -> None:
    prefect_url = SERVICES["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_url = SERVICES["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    optuna_url = SERVICES["worker"]["environment"]["DEEPRNN_OPTUNA_STORAGE"]
    assert prefect_url.startswith(f"{ts.PREFECT_DRIVER}://{ts.ROLE}:")
    assert mlflow_url.startswith(f"{ts.MLFLOW_DRIVER}://{ts.ROLE}:")
    assert optuna_url.startswith(f"{ts.MLFLOW_DRIVER}://{ts.ROLE}:")
    stack = ts.Stack(Path("/x"), "pw", "admin", "/bin", "/x/pg", 1, 2, 3)
    assert stack.database_url("prefect", ts.PREFECT_DRIVER).startswith("postgresql+asyncpg://deeprnn:pw@")
    assert stack.database_url("optuna", masked=True) == "postgresql://deeprnn:***@127.0.0.1:1/optuna"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = {re.split(r"[\[<>=]", r)[0].lower() for r in pyproject["project"]["optional-dependencies"]["postgres"]}
    assert {"psycopg", "asyncpg"} <= extra  # psycopg 3 for postgresql://, asyncpg for postgresql+asyncpg://
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["psycopg"] == pins["psycopg-binary"] and pins["psycopg"].startswith("3.")
    assert "asyncpg" in pins
    assert '".[test,postgres]"' in (ROOT / "scripts" / "test.sh").read_text()


def test_mlflow_serves_the_artifacts_the_same_way() -> None:
    compose_mlflow = command("mlflow")
    for flag in ts.MLFLOW_ARTIFACT_FLAGS:
        assert flag in compose_mlflow and flag in DOC
    assert SERVICES["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "--default-artifact-root" not in compose_mlflow  # proxied: no client-side artifact root
    assert "mlflow-artifacts:/" in DOC


def test_the_work_pool_is_prefect_yamls() -> None:
    prefect_yaml = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {pool["name"] for pool in prefect_yaml["definitions"]["work_pools"].values()}
    assert pools == {ts.POOL}
    assert f"--pool {ts.POOL}" in command("worker")
    assert f"work-pool create {ts.POOL} --type process" in command("deploy")
    assert "deploy --all" in command("deploy") and "deeprnn setup-server" in command("deploy")


def test_the_docs_give_the_one_command_and_are_in_the_site() -> None:
    assert "python scripts/team_stack.py up --dir .team --workers 2 --deploy" in DOC
    assert "python scripts/team_stack.py down --dir .team" in DOC
    assert "deeprnn run --resume" in DOC
    assert "team-stack.md" in (ROOT / "mkdocs.yml").read_text()
    assert "(docs/team-stack.md)" in (ROOT / "README.md").read_text()


def test_the_command_line_refuses_a_folder_without_a_stack_in_one_line(tmp_path: Path, capsys: Any) -> None:
    assert ts.main(["status", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no stack in" in err and "Traceback" not in err
    ts.down(tmp_path)  # nothing to stop: nothing happens
    assert list(tmp_path.iterdir()) == []


def test_without_postgresql_one_line_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no initdb on PATH, and no Debian folder of versions
    with pytest.raises(ts.StackError) as refused:
        ts.find_postgres(tmp_path / "no-postgresql")
    assert str(refused.value) == (
        "PostgreSQL is not installed: install Debian's postgresql package (apt-get install -y postgresql)"
    )
