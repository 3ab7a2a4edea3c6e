"""prefect.yaml against a real ``prefect server`` on 127.0.0.1: deploy every deployment with the CLI, start a
process worker in the project folder, run the ``smoke`` deployment with an overridden parameter, and follow the
trigger to the evaluation it starts. Also: the server refuses out-of-range parameters, and every field of the
dashboard's form has a title, a description and bounds or choices."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml
from corpora import CORPUS_SHA1 as BOOK_SHA1  # the book's SHA-1, or the stand-in's without the book
from corpora import TRAIN_EXPERIMENT
from live_servers import WORKER_QUERY_SECONDS, AlertReceiver, Server, log_tail, start_process, stop_process_group
from mlflow.tracking import MlflowClient

from deeprnn.config import SECTIONS, CellType, preset_config, resolve
from deeprnn.flows.parameters import preset_sections

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
POOL = PREFECT_YAML["definitions"]["work_pools"]["process"]["name"]
RUN_TIMEOUT = 600.0  # seconds for a smoke run (about 20 s on an idle machine) to reach a final state
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_cli(server: Server, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``prefect ARGS`` from the project folder against the test's server."""
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=PROJECT_ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def api(server: Server, method: str, path: str, **kwargs: Any) -> requests.Response:
    """One call to the Prefect REST API."""
    return requests.request(method, server.url + path, timeout=30, **kwargs)


@dataclass
class Deployed:
    """The server after ``prefect deploy --all``: its deployments by name and its automations."""

    server: Server
    deployments: dict[str, dict[str, Any]]
    automations: list[dict[str, Any]]


@pytest.fixture(scope="module")
def deployed(prefect_server: Server) -> Deployed:
    """Create the work pool and deploy everything in prefect.yaml, exactly as the README says."""
    pool = prefect_cli(prefect_server, "work-pool", "create", POOL, "--type", "process")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deploy = prefect_cli(prefect_server, "--no-prompt", "deploy", "--all")
    assert deploy.returncode == 0, deploy.stdout[-4000:] + deploy.stderr[-4000:]
    found = api(prefect_server, "POST", "/deployments/filter", json={}).json()
    automations = api(prefect_server, "POST", "/automations/filter", json={}).json()
    return Deployed(prefect_server, {d["name"]: d for d in found}, automations)


@pytest.fixture(scope="module")
def worker(deployed: Deployed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A process worker started in the project folder, logging to a fresh MLflow store; stopped before the server."""
    root = tmp_path_factory.mktemp("worker")
    env = {
        **deployed.server.env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "DEEPRNN_CACHE_DIR": str(root / "cache"),
        "PREFECT_WORKER_QUERY_SECONDS": WORKER_QUERY_SECONDS,
    }
    # Experiments made up front keep artifacts in the test's folder (a sqlite store's default is ./mlruns).
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    for experiment in {"deeprnn-train", TRAIN_EXPERIMENT, "deeprnn-evaluate"}:
        client.create_experiment(experiment, artifact_location=(root / "artifacts" / experiment).as_uri())
    log = root / "worker.log"
    proc = start_process(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", "test-worker"],
        log,
        env,
        cwd=PROJECT_ROOT,
    )
    try:
        yield {"root": root, "log": log, "tracking_uri": env["MLFLOW_TRACKING_URI"]}
    finally:
        # Ctrl-C is the worker's graceful stop; the fixture order stops it before the server. Prefect's worker
        # can wait out a flow run it started (the last test's is killed): a few seconds, then SIGKILL.
        stop_process_group(proc, first=signal.SIGINT, grace=5)


def wait_for_final_state(server: Server, flow_run_id: str, log: Path, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Poll a flow run until it is Completed, Failed, Crashed or Cancelled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api(server, "GET", f"/flow_runs/{flow_run_id}").json()
        if run["state_type"] in FINAL_STATES:
            return run
        time.sleep(2)
    pytest.fail(f"flow run {flow_run_id} not finished after {timeout:.0f} s; worker log:\n{log_tail(log)}")


def wait_for_triggered_run(server: Server, deployment_id: str, parameter: str, value: str, log: Path) -> dict[str, Any]:
    """Poll until a run of ``deployment_id`` with ``parameter == value`` exists (created by an automation)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        runs = api(server, "POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment_id]}}}).json()
        for run in runs:
            if run["parameters"].get(parameter) == value:
                return run
        time.sleep(2)
    pytest.fail(f"no run of deployment {deployment_id} with {parameter}={value}; worker log:\n{log_tail(log)}")


def leaf_fields(schema: dict[str, Any], node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every form field of a parameter schema, with ``$ref`` and ``Optional`` (anyOf with null) resolved.

    Yields ``(dotted path, the field's own schema merged with its non-null type's)``."""
    options = [o for o in node.get("anyOf", [node]) if o.get("type") != "null"]
    assert len(options) == 1, f"{path}: one type expected, got {options}"
    inner = options[0]
    if "$ref" in inner:
        inner = schema["definitions"][inner["$ref"].rsplit("/", 1)[-1]]
    if inner.get("type") == "object" and "properties" in inner:
        for name, child in inner["properties"].items():
            yield from leaf_fields(schema, child, f"{path}.{name}" if path else name)
        return
    yield path, {**inner, **{k: v for k, v in node.items() if k in ("title", "description")}}


def bounded(field: dict[str, Any]) -> bool:
    """True when a form field limits its values: choices, both numeric bounds, a pattern or length bound."""
    kind = field.get("type")
    if "enum" in field or kind == "boolean":
        return True
    if kind in ("integer", "number"):
        low = "minimum" in field or "exclusiveMinimum" in field
        high = "maximum" in field or "exclusiveMaximum" in field
        return low and high
    if kind == "string":
        return "pattern" in field or "maxLength" in field
    if kind == "array":
        return "maxItems" in field and bounded(field["items"])
    return False


def test_deploy_creates_every_deployment_with_pool_schedules_and_portable_pull(deployed: Deployed) -> None:
    deployments = deployed.deployments
    declared = {d["name"] for d in PREFECT_YAML["deployments"]}
    assert set(deployments) == declared >= {"d2l-9.3", "full-book", "smoke", "evaluate"}
    for name, d in deployments.items():
        assert d["work_pool_name"] == POOL, name
        assert d["enforce_parameter_schema"] is True, name
        # Portable: nothing of the machine that deployed it (no absolute path anywhere in how it is pulled).
        stored = json.dumps([d["pull_steps"], d["job_variables"], d["path"]])
        assert str(PROJECT_ROOT) not in stored and not re.search(r'"/', stored), (name, stored)
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]
    for preset in ("d2l-9.3", "full-book", "smoke"):
        assert deployments[preset]["parameters"]["preset"] == preset

    schedules = [s for d in deployments.values() for s in d["schedules"]]
    nightly = [s for s in schedules if s["active"] and s["schedule"].get("cron") and s["parameters"]]
    assert nightly, "an active cron schedule with its own parameters"
    assert nightly[0]["parameters"]["experiment"]
    assert any(not s["active"] for s in schedules), "a schedule created inactive"
    book = {s["slug"]: s for s in deployments["d2l-9.3"]["schedules"]}
    assert book["nightly"]["schedule"]["cron"] == "0 2 * * *" and book["nightly"]["active"] is True
    assert book["weekly-gru"]["active"] is False and book["weekly-gru"]["parameters"]["model"] == {"cell": "gru"}

    # The trigger: a reactive automation that runs the evaluate deployment on every completed training run.
    (trigger,) = [a for a in deployed.automations if a["name"] == "evaluate-after-training"]
    assert trigger["enabled"] is True
    assert trigger["trigger"]["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["trigger"]["match_related"]["prefect.resource.name"] == "deeprnn-train"
    (action,) = trigger["actions"]
    assert action["type"] == "run-deployment" and action["deployment_id"] == deployments["evaluate"]["id"]


def test_parameter_form_has_title_description_and_bounds_for_every_field(deployed: Deployed) -> None:
    for name in ("smoke", "evaluate"):
        schema = deployed.deployments[name]["parameter_openapi_schema"]
        fields = dict(leaf_fields(schema, {"type": "object", "properties": schema["properties"]}, ""))
        assert len(fields) > (30 if name == "smoke" else 8)
        for path, field in fields.items():
            assert field.get("title") and field.get("description"), (name, path, field)
            assert bounded(field), (name, path, field)
        # Prefect titles a parameter with its Python name unless told otherwise: each one has a real title.
        for param, prop in schema["properties"].items():
            assert prop["title"] != param and prop.get("description"), (name, param, prop)
    # The sweep's own parameters (its sections are checked above).
    for param, prop in deployed.deployments["sweep"]["parameter_openapi_schema"]["properties"].items():
        assert prop["title"] != param and prop.get("description"), ("sweep", param, prop)
    train = deployed.deployments["smoke"]["parameter_openapi_schema"]
    preset = train["properties"]["preset"]  # empty: the book's preset for the book, text for any other corpus
    choices = [option.get("enum") for option in preset.get("anyOf", [preset]) if option.get("enum")]
    assert choices == [["d2l-9.3", "full-book", "smoke", "text"]]
    assert train["properties"]["preset"]["title"] == "Preset"
    # The sections are the configuration's own models: a field that is never empty is a plain field, no toggle.
    assert set(train["definitions"]) == {"DataConfig", "ModelConfig", "TrainConfig", "SampleConfig"}
    model = train["definitions"]["ModelConfig"]["properties"]
    assert model["cell"]["enum"] == list(typing.get_args(CellType)) and "anyOf" not in model["cell"]
    training = train["definitions"]["TrainConfig"]["properties"]
    assert training["optimizer"]["enum"] == ["sgd", "adam", "adamw"]
    assert training["device"]["enum"] == ["auto", "cpu", "cuda", "mps"]
    assert {k: v for k, v in training["epochs"].items() if k != "description"} == {
        "type": "integer",
        "title": "Epochs",
        "minimum": 1,
        "maximum": 100000,
        "default": 500,
    }
    assert "anyOf" not in training["lr"] and training["lr"]["type"] == "number"
    for section, definition in (("data", "DataConfig"), ("model", "ModelConfig"), ("train", "TrainConfig")):
        ref = train["properties"][section]["anyOf"]
        assert ref == [{"$ref": f"#/definitions/{definition}"}, {"type": "null"}], (section, ref)


def test_each_deployment_form_is_pre_filled_with_what_will_run(deployed: Deployed) -> None:
    """The deployed parameters are the presets' complete sections, valid against the deployment's own schema."""
    from prefect.utilities.schema_tools import validate

    book = deployed.deployments["d2l-9.3"]["parameters"]
    assert book["train"]["epochs"] == 500 and book["train"]["lr"] == 2.0 and book["model"]["num_layers"] == 2
    for name in ("d2l-9.3", "full-book", "smoke"):
        deployment = deployed.deployments[name]
        assert deployment["parameters"] == {"preset": name, **preset_sections(name)}, name
        validate(deployment["parameters"], deployment["parameter_openapi_schema"], raise_on_error=True)
    full = deployed.deployments["full-book"]["parameters"]
    assert (full["train"]["epochs"], full["train"]["optimizer"], full["model"]["num_hiddens"]) == (30, "adamw", 512)
    assert full["data"]["max_tokens"] is None
    sweep = deployed.deployments["sweep"]
    validate(sweep["parameters"], sweep["parameter_openapi_schema"], raise_on_error=True)
    assert sweep["parameters"]["train"]["epochs"] == 100
    form = sweep["parameter_openapi_schema"]["properties"]  # one form picks the search
    assert form["search"]["enum"] == ["grid", "random", "optuna"] and form["search"]["title"] == "Search"
    assert form["pruner"]["enum"] == ["asha", "median", "none"] and form["pruner"]["title"] == "Pruner"


# The values a deployment's sections may hold that its preset does not: the sweep trains 100 epochs a trial.
DEPLOYMENT_CHANGES: dict[str, dict[str, dict[str, Any]]] = {"sweep": {"train": {"epochs": 100}}}


def test_prefect_yaml_holds_the_presets_sections_exactly() -> None:
    """Fails when a preset's value is edited in deeprnn/config.py or in prefect.yaml only."""
    checked = set()
    for deployment in PREFECT_YAML["deployments"]:
        parameters = deployment.get("parameters") or {}
        if "preset" not in parameters:
            continue
        name, preset = deployment["name"], parameters["preset"]
        given = tuple(s for s in SECTIONS if s in parameters)
        assert given, f"{name}: no sections: its form would show none of the values that run"
        expected = preset_sections(preset, DEPLOYMENT_CHANGES.get(name), given)
        actual = {s: parameters[s] for s in given}
        assert actual == expected, (
            f"deployment {name!r} in prefect.yaml disagrees with preset {preset!r}; its sections should be:\n"
            + yaml.safe_dump(expected, sort_keys=False)
        )
        checked.add(name)
    assert checked == {"d2l-9.3", "full-book", "smoke", "prepare", "sweep"}
    entrypoints = {d["name"]: d.get("entrypoint") for d in PREFECT_YAML["deployments"]}
    assert all(entrypoints[n] == "deeprnn.flows.train_flow:train_lm" for n in ("d2l-9.3", "full-book", "smoke"))
    # Module paths, not files: the same entrypoint runs from a checkout and from an installed wheel.
    from prefect.flows import Flow, load_flow_from_entrypoint

    for name, entrypoint in entrypoints.items():
        assert re.fullmatch(r"deeprnn\.flows\.\w+:\w+", entrypoint), (name, entrypoint)
        assert isinstance(load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False), Flow), name
    # Every section the training flow takes is there: nothing falls back to a value the form does not show.
    assert all(set(SECTIONS) <= set(d["parameters"]) for d in PREFECT_YAML["deployments"] if d["name"] == "smoke")


def test_schedule_parameters_merged_over_the_deployments_run_the_intended_configuration() -> None:
    """Prefect merges a schedule's parameters over the deployment's one parameter at a time (a schedule's
    ``model: {cell: gru}`` replaces the whole ``model``); the flow then keeps the preset's other fields."""
    from deeprnn.flows.train_flow import train_lm

    (book,) = [d for d in PREFECT_YAML["deployments"] if d["name"] == "d2l-9.3"]
    configs = {}
    for schedule in book["schedules"]:
        merged = {**book["parameters"], **schedule["parameters"]}  # as the server builds a scheduled run's
        bound = train_lm.validate_parameters(merged)
        configs[schedule["slug"]] = resolve(bound["preset"], *(bound[s] for s in SECTIONS))
    assert configs["nightly"] == preset_config("d2l-9.3")
    assert configs["weekly-gru"] == preset_config("d2l-9.3", {"model": {"cell": "gru"}})
    assert configs["weekly-gru"].model.num_hiddens == 256 and configs["weekly-gru"].train.epochs == 500


def test_server_refuses_out_of_range_parameters_when_the_run_is_created(deployed: Deployed) -> None:
    server, smoke = deployed.server, deployed.deployments["smoke"]

    def count_runs() -> int:
        body = {"deployments": {"id": {"any_": [smoke["id"]]}}}
        return api(server, "POST", "/flow_runs/count", json=body).json()

    before = count_runs()
    for parameters, field in (
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"model": {"dropout": 1.5}}, "model.dropout"),
        ({"preset": "tiny"}, "preset"),
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
    ):
        response = api(server, "POST", f"/deployments/{smoke['id']}/create_flow_run", json={"parameters": parameters})
        assert response.status_code == 409, (parameters, response.text)
        assert f"'{field}'" in response.json()["detail"], response.text
    # The same from the CLI a user would type.
    cli = prefect_cli(server, "deployment", "run", "deeprnn-train/smoke", "--param", 'model={"num_layers": 0}')
    assert cli.returncode != 0
    assert "model.num_layers" in cli.stdout + cli.stderr and "minimum of 1" in cli.stdout + cli.stderr
    assert count_runs() == before, "a refused run must not exist"


def test_smoke_deployment_runs_on_a_worker_and_triggers_the_evaluation(
    deployed: Deployed, worker: dict[str, Any], book_url: str
) -> None:
    server, log = deployed.server, worker["log"]
    runs_dir = worker["root"] / "runs"
    created = prefect_cli(
        server,
        "deployment",
        "run",
        "deeprnn-train/smoke",
        "--param",
        'train={"epochs": 2, "device": "cpu"}',
        "--param",
        f"data={json.dumps({'url': book_url, 'sha1': BOOK_SHA1})}",
        "--param",
        f"runs_dir={runs_dir}",
    )
    assert created.returncode == 0, created.stdout + created.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout).group(1)

    training = wait_for_final_state(server, flow_run_id, log)
    assert training["state_type"] == "COMPLETED", log_tail(log)
    assert training["parameters"]["train"] == {"epochs": 2, "device": "cpu"}
    evaluate_id = deployed.deployments["evaluate"]["id"]
    evaluation = wait_for_triggered_run(server, evaluate_id, "training_flow_run_id", flow_run_id, log)
    evaluation = wait_for_final_state(server, evaluation["id"], log)
    assert evaluation["state_type"] == "COMPLETED", log_tail(log)

    # MLflow: the training run, with the overridden parameter, its curves and system metrics ...
    client = MlflowClient(tracking_uri=worker["tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    (train_run,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert train_run.info.status == "FINISHED"
    assert train_run.data.params["train.epochs"] == "2" and train_run.data.params["preset"] == "smoke"
    assert train_run.data.params["train.batch_size"] == "8"  # a field the run's train section left out: smoke's
    assert train_run.data.tags["prefect.deployment"] == "smoke"
    steps = [m.step for m in client.get_metric_history(train_run.info.run_id, "train_perplexity")]
    assert sorted(steps) == [1, 2]
    assert client.get_metric_history(train_run.info.run_id, "system/cpu_utilization_percentage")
    assert (runs_dir / train_run.info.run_id / "model.pt").is_file()
    # ... and the evaluation run, which measured the same model on the same held-out text.
    (eval_run,) = client.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{evaluation['id']}'")
    assert eval_run.info.status == "FINISHED"
    assert client.get_experiment(eval_run.info.experiment_id).name == "deeprnn-evaluate"
    assert eval_run.data.params["source_run_id"] == train_run.info.run_id
    assert eval_run.data.params["model_uri"] == f"runs:/{train_run.info.run_id}/model"
    assert eval_run.data.metrics["test_perplexity"] == pytest.approx(
        train_run.data.metrics["test_perplexity"], rel=1e-5
    )
    assert {"samples.txt", "samples.json"} <= {a.path for a in client.list_artifacts(eval_run.info.run_id)}

    # Prefect artifacts: a markdown summary and a progress bar on the training run, a summary on the evaluation.
    def artifacts(run_id: str) -> list[dict[str, Any]]:
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        return api(server, "POST", "/artifacts/filter", json=body).json()

    by_type = {a["type"]: a for a in artifacts(flow_run_id)}
    summary = by_type["markdown"]["data"]
    assert by_type["markdown"]["key"] == "deeprnn-train-summary"
    assert train_run.info.run_id in summary
    assert f"{train_run.data.metrics['test_perplexity']:.3f}" in summary and "tokens/s" in summary and "cpu" in summary
    samples_file = client.download_artifacts(train_run.info.run_id, "samples.json", str(worker["root"]))
    samples = json.loads(Path(samples_file).read_text())
    assert samples and all(f"`{text}`" in summary for text in samples.values())
    assert by_type["progress"]["data"] == pytest.approx(100.0)
    (eval_summary,) = [a for a in artifacts(evaluation["id"]) if a["type"] == "markdown"]
    assert eval_summary["key"] == "deeprnn-evaluation-summary"
    assert train_run.info.run_id in eval_summary["data"]
    assert f"{eval_run.data.metrics['test_perplexity']:.3f}" in eval_summary["data"]


# ----- running unattended: one training per GPU, alerts (zombie runs: tests/e2e/test_team_stack.py) ---------


ZOMBIE_AFTER = 60  # two missed heartbeats (every 30 s): long enough that a busy machine's runs are not taken for dead


@pytest.fixture(scope="module")
def unattended(deployed: Deployed, worker: dict[str, Any]) -> Iterator[AlertReceiver]:
    """`deeprnn setup-server` as the README gives it: one training slot, zombie detection, alerts to a receiver."""
    receiver = AlertReceiver()
    setup = subprocess.run(
        [
            sys.executable,
            "-m",
            "deeprnn.cli.app",
            "setup-server",
            "--training-slots",
            "1",
            "--alert-webhook",
            receiver.url,
            "--allow-private-urls",
            "--zombie-after",
            str(ZOMBIE_AFTER),
        ],
        cwd=PROJECT_ROOT,
        env=deployed.server.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    try:
        yield receiver
    finally:
        receiver.stop()


def _create_run(server: Server, deployment: dict[str, Any], parameters: dict[str, Any]) -> str:
    """Create a flow run of ``deployment``; a busy sqlite server may answer 503, which Prefect's client retries too."""
    for attempt in range(6):
        response = api(
            server, "POST", f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}
        )
        if response.status_code != 503:
            break
        time.sleep(1 + attempt)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _smoke_parameters(book_url: str, root: Path, **train: Any) -> dict[str, Any]:
    return {
        "train": {"epochs": 2, "device": "cpu", **train},
        "data": {"url": book_url, "sha1": BOOK_SHA1},
        "runs_dir": str(root / "runs"),
    }


def test_setup_server_creates_the_training_slot_the_zombie_automation_and_the_alert(
    deployed: Deployed, unattended: AlertReceiver
) -> None:
    server = deployed.server
    queue = api(server, "GET", f"/work_pools/{POOL}/queues/training").json()
    assert queue["concurrency_limit"] == 1
    for name in ("d2l-9.3", "full-book", "smoke", "sweep"):
        assert deployed.deployments[name]["work_queue_name"] == "training", name
        assert deployed.deployments[name]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    automations = {a["name"]: a for a in api(server, "POST", "/automations/filter", json={}).json()}
    zombie = automations["deeprnn-crash-zombie-flow-runs"]
    assert zombie["trigger"]["posture"] == "Proactive" and zombie["trigger"]["within"] == ZOMBIE_AFTER
    assert zombie["actions"][0]["type"] == "change-flow-run-state" and zombie["actions"][0]["state"] == "CRASHED"
    alert = automations["deeprnn-alert-on-failure"]
    assert set(alert["trigger"]["expect"]) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert alert["actions"][0]["type"] == "send-notification"
    assert "mark-crashed-mlflow-runs" in automations  # from prefect.yaml, by `prefect deploy --all`
    # Running it again updates rather than duplicates.
    again = subprocess.run(
        [sys.executable, "-m", "deeprnn.cli.app", "setup-server", "--zombie-after", str(ZOMBIE_AFTER)],
        cwd=PROJECT_ROOT,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    names = [a["name"] for a in api(server, "POST", "/automations/filter", json={}).json()]
    assert names.count("deeprnn-crash-zombie-flow-runs") == 1 and names.count("deeprnn-alert-on-failure") == 1


def test_two_training_runs_created_at_once_take_the_one_slot_in_turn(
    deployed: Deployed, worker: dict[str, Any], unattended: AlertReceiver, book_url: str
) -> None:
    server, smoke = deployed.server, deployed.deployments["smoke"]
    ids = [_create_run(server, smoke, _smoke_parameters(book_url, worker["root"])) for _ in range(2)]
    runs = sorted((wait_for_final_state(server, i, worker["log"]) for i in ids), key=lambda r: r["start_time"])
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], log_tail(worker["log"])
    first, second = runs
    # The second waited for the slot: it started only once the first had ended.
    assert second["start_time"] >= first["end_time"], (first["start_time"], first["end_time"], second["start_time"])


def test_a_failed_run_is_alerted_with_its_name_and_message_and_its_logs_have_no_traceback(
    deployed: Deployed, worker: dict[str, Any], unattended: AlertReceiver, fault_server: Any
) -> None:
    server = deployed.server
    url = fault_server.url("/missing/deployment/timemachine.txt")
    params = {**_smoke_parameters(url, worker["root"]), "data": {"url": url}}
    run = wait_for_final_state(server, _create_run(server, deployed.deployments["smoke"], params), worker["log"])
    assert run["state_type"] == "FAILED"
    alert = unattended.wait_for(run["name"])
    assert "HTTP 404 Not Found" in alert["text"] and "Failed" in alert["text"] and "deeprnn-train" in alert["text"]
    # The dashboard's view of the same run: the message, once per stage that reports it, and no traceback.
    logs = api(server, "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    text = "\n".join(entry["message"] for entry in logs)
    assert "HTTP 404 Not Found" in text and "Traceback" not in text, text[-3000:]
    assert "HTTP 404 Not Found" in run["state"]["message"]
