"""Pinned, upgradable stores: the tested versions are the pinned ones, and an MLflow store made by an older MLflow
is refused with one message naming `mlflow db upgrade`, after which it works."""

from __future__ import annotations

from pathlib import Path

import mlflow
import prefect
import pytest
import sqlalchemy
import torch
import yaml
from alembic import command
from mlflow.store.db.utils import _get_alembic_config
from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
from mlflow.tracking import MlflowClient

import deeprnn.tracking.store
from deeprnn.flows.train_flow import train_lm

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# The schema of MLflow 3.0's stores (its logged-model tables), well below the installed MLflow's.
OLD_REVISION = "400f98739977"
STAMPED_REVISION = "17e22815139b"  # a few migrations before the installed MLflow's head


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_the_installed_versions_are_the_pinned_ones() -> None:
    pins = _pins()
    assert pins["prefect"] == prefect.__version__
    assert pins["mlflow"] == mlflow.__version__
    assert pins["torch"] == torch.__version__.split("+")[0]
    assert "deeprnn" not in pins  # the project itself is not a constraint
    assert yaml.safe_load((REPO / "prefect.yaml").read_text())["prefect-version"] == prefect.__version__
    assert "-c constraints.txt" in (REPO / "scripts" / "test.sh").read_text()


def _build_store(path: Path, revision: str) -> str:
    """A sqlite store built as MLflow builds one, by its own migrations, but only up to ``revision``."""
    uri = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(uri)
    InitialBase.metadata.create_all(engine)  # MLflow's first schema, where its own store creation starts
    with engine.begin() as connection:
        config = _get_alembic_config(uri)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()
    return uri


def _schema_revision(uri: str) -> str:
    engine = sqlalchemy.create_engine(uri)
    with engine.connect() as connection:
        (revision,) = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).one()
    engine.dispose()
    return revision


@pytest.fixture
def local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPRNN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "mlflow.db"


def test_a_store_of_an_older_mlflow_is_upgraded_on_first_use_keeping_its_experiments(
    local_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = _build_store(local_store, OLD_REVISION)  # MLflow 3.0's schema: later releases added tables to it
    engine = sqlalchemy.create_engine(uri)
    experiments = sqlalchemy.Table("experiments", sqlalchemy.MetaData(), autoload_with=engine)
    with engine.begin() as connection:
        connection.execute(
            experiments.insert().values(
                name="kept", artifact_location=str(local_store.parent / "a"), lifecycle_stage="active"
            )
        )
    engine.dispose()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert deeprnn.tracking.store.check_reachable() == uri  # MLflow migrates a store that lacks its newer tables itself
    assert _schema_revision(uri) == _get_latest_revision()
    assert MlflowClient().get_experiment_by_name("kept") is not None
    run_id = MlflowClient().create_run(deeprnn.tracking.store.experiment_id("after-upgrade")).info.run_id
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"


def test_a_store_mlflow_will_not_upgrade_itself_is_refused_naming_mlflow_db_upgrade(
    local_store: Path, monkeypatch: pytest.MonkeyPatch, prefect_api: str, book_url: str
) -> None:
    # Every table there, but the schema recorded as an older release's: MLflow refuses such a store rather than
    # migrate it (real for stores whose later migrations only changed columns).
    uri = _build_store(local_store, _get_latest_revision())
    config = _get_alembic_config(uri)
    command.stamp(config, STAMPED_REVISION)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(deeprnn.tracking.store.TrackingStoreOutdatedError) as info:
        deeprnn.tracking.store.check_reachable()
    message = str(info.value)
    assert f"mlflow db upgrade {uri}" in message and "created by an older MLflow" in message
    assert STAMPED_REVISION in message
    # A run is refused with that message before it downloads anything.
    state = train_lm(preset="smoke", data={"url": book_url}, train={"device": "cpu", "epochs": 1}, return_state=True)
    assert state.is_failed() and f"mlflow db upgrade {uri}" in state.message
    assert not (local_store.parent / "cache").exists()
    assert _schema_revision(uri) == STAMPED_REVISION  # untouched


def _get_latest_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()
