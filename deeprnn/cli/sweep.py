"""``deeprnn sweep``: a grid, random or adaptive (Optuna) search, run as an Optuna study, one model per trial on
a Dask cluster, tracked as one MLflow parent run with a child per trial."""

from __future__ import annotations

import inspect
import os
from typing import Annotated, Any, Optional

import typer

from deeprnn.cli import launch, options, preflight
from deeprnn.cli.output import console, fail, print_line, print_sweep, write_json
from deeprnn.config import PRESETS
from deeprnn.ops.study_storage import STORAGE_ENV
from deeprnn.search.optuna_study import DEFAULT_TRIALS, SAMPLERS
from deeprnn.training.stop_signals import handle_stop_signals

SWEEP_NAME = "deeprnn-sweep"  # the flow's name, and the experiment of a sweep that names none
# A stopped sweep closes its Dask cluster, whose workers end their trials first: more than a run's stop.
SWEEP_STOP_SECONDS = 30.0


def before_start(exc: KeyboardInterrupt) -> str:
    """What a sweep stopped before its flow started left: nothing."""
    return f"by {getattr(exc, 'signal_name', 'SIGINT')} before the sweep started: nothing was trained or changed"


def sweep_stopped(exc: KeyboardInterrupt) -> str:
    """What a stopped sweep kept, in one line."""
    return (
        f"by {getattr(exc, 'signal_name', 'SIGINT')}: the sweep's MLflow run is marked KILLED; the trials that "
        "finished keep their MLflow runs and their place in the study, the others are stopped with the Dask "
        "cluster: run the same sweep again to continue it"
    )


# The dimensions most sweeps vary get options of their own (comma-separated values); any other field goes
# through --param. Name: (configuration field, help).
DIMENSIONS = {
    "cell": ("model.cell", "Cell types to try, comma-separated: lstm,gru,rnn."),
    "num_layers": ("model.num_layers", "Layer counts to try, e.g. 1,2,3."),
    "num_hiddens": ("model.num_hiddens", "Hidden sizes to try, e.g. 128,256."),
    "dropout": ("model.dropout", "Dropout values to try, e.g. 0,0.2."),
    "lr": ("train.lr", "Learning rates to try, e.g. 0.5,1,2."),
    "optimizer": ("train.optimizer", "Optimizers to try: sgd,adam,adamw."),
}
# Configuration fields fixed for every trial, with the options `deeprnn run` gives them.
FIXED = ("epochs", "device", "data_url", "data_sha1")


Preset = Annotated[str, typer.Option("--preset", help=f"Named preset every trial starts from: {', '.join(PRESETS)}.")]
Param = Annotated[
    list[str],
    typer.Option("--param", help="Any field: section.field=v1,v2 (one value: fixed for all trials). Repeatable."),
]
Space = Annotated[
    Optional[str], typer.Option("--space", help="YAML file mapping fields to values or {low, high, log} ranges.")
]
Random = Annotated[
    bool, typer.Option("--random", help="Random search: draw --max-trials points instead of the whole grid.")
]
MaxTrials = Annotated[
    Optional[int],
    typer.Option(
        "--max-trials",
        min=1,
        help="Trials a random search draws, or an optuna search adds to its study (default 10); a grid larger "
        "than this is refused.",
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed", min=0, help="Seed of the random search (to vary the training seed: --param train.seed=0,1,2)."
    ),
]
RunsDir = Annotated[str, typer.Option("--runs-dir", help="Checkpoint folder on each worker, one subfolder per trial.")]
ClusterAddress = Annotated[
    Optional[str],
    typer.Option(
        "--cluster-address",
        envvar="DEEPRNN_DASK_ADDRESS",
        help="Dask scheduler to use, e.g. tcp://10.0.0.5:8786. Default: a new cluster on this machine.",
    ),
]
Workers = Annotated[
    Optional[int],
    typer.Option(
        "--workers",
        min=1,
        envvar="DEEPRNN_DASK_WORKERS",
        help="Worker processes of the local cluster (default: one per GPU, else one per CPU core).",
    ),
]
Search = Annotated[
    str, typer.Option("--search", help="grid, random (as --random) or optuna (adaptive: TPE, with a pruner).")
]
Pruner = Annotated[
    str, typer.Option("--pruner", help="With --search optuna: asha, median or none (stops trials falling behind).")
]
# Each search has its sampler (grid, random, tpe); --sampler tpe is still taken with --search optuna.
Sampler = Annotated[Optional[str], typer.Option("--sampler", hidden=True)]
Storage = Annotated[
    Optional[str],
    typer.Option(
        "--storage",
        envvar="DEEPRNN_OPTUNA_STORAGE",
        help="Where the sweep's Optuna study lives: an RDB URL (sqlite:///studies.db, postgresql://...) or a "
        "journal file (default: optuna.journal here).",
    ),
]
Study = Annotated[
    Optional[str],
    typer.Option(
        "--study",
        help="The study's name (default: the experiment, the search and a digest of it: "
        "the same sweep again continues it).",
    ),
]
RegisterBest = Annotated[
    bool, typer.Option("--register-best/--no-register-best", help="Register the best trial's model.")
]


def sweep(
    preset: Preset = "d2l-9.3",
    param: Param = [],  # noqa: B006 - Typer's default for a repeatable option; never mutated
    space_file: Space = None,
    random_search: Random = False,
    search: Search = "grid",
    pruner: Pruner = "asha",
    sampler: Sampler = None,
    storage: Storage = None,
    study: Study = None,
    max_trials: MaxTrials = None,
    seed: Seed = 0,
    experiment: options.Experiment = None,
    runs_dir: RunsDir = "runs",
    cluster_address: ClusterAddress = None,
    workers: Workers = None,
    register_best: RegisterBest = True,
    registered_model: options.RegisteredModel = None,
    json_out: options.JsonOut = None,
    **values: Any,
) -> None:
    """Grid, random or Optuna search as an Optuna study: one model per trial on a Dask cluster; an MLflow parent
    run, a child per trial. Run it again to continue it."""
    options.check_registered_model(registered_model)
    if search == "optuna" and random_search:
        fail("--random and --search optuna each choose the search: give one")
    search = "random" if random_search else search
    if sampler is not None and sampler != SAMPLERS.get(search):
        fail(f"unknown sampler {sampler!r}; choose one of: {SAMPLERS.get(search, 'tpe')}")
    fixed = options.overrides({name: values.get(name) for name in FIXED})
    # A dimension option is its field's --param, before those given (a later one wins).
    params = [f"{field}={values[name]}" for name, (field, _) in DIMENSIONS.items() if values.get(name) is not None]
    settings = dict(search=search, max_trials=max_trials, pruner=pruner, seed=seed)
    named = dict(study=study, experiment=experiment or SWEEP_NAME)
    spec = _check(preset, fixed, space_file, params + param, storage, **named, **settings)
    first = spec.first_point().config
    if cluster_address is None:  # a remote cluster's workers have files and devices of their own
        preflight.check_source(first.data.url)
        preflight.check_device(first.train.device)
    flow = _start(spec, preset, cluster_address, workers, use_gpus=first.train.device != "cpu")
    if spec.shown_storage != spec.storage:  # the flow, here, and the local Dask workers read the URL from here
        os.environ[STORAGE_ENV] = spec.storage
    parameters = dict(space=spec.space, preset=preset, study=spec.name, storage=spec.shown_storage, **fixed)
    parameters.update(experiment=experiment, runs_dir=runs_dir, register_best=register_best)
    result = launch.invoke(lambda: flow(**parameters, **settings, registered_model=registered_model), sweep_stopped)
    print_sweep(result)
    write_json(result.as_record(), json_out)


def _check(
    preset: str, fixed: dict[str, Any], space_file: str | None, params: list[str], given: str | None, **settings: Any
) -> Any:
    """The study to run, checked before anything starts: search, pruner, space (the YAML file, then each
    ``section.field=values`` of ``params``, a later one winning; its ends and every grid or random point as
    configurations), the storage opened, and a study of that name holding the same search with something left
    to run. Exits 2 saying why when any is wrong."""
    from deeprnn.data.urls import has_password, is_masked
    from deeprnn.ops.study_storage import study_storage
    from deeprnn.search.optuna_study import check_storage, study_spec
    from deeprnn.search.space import field_path, load_space, parse_values

    try:  # SearchSpaceError and StudyError are ValueErrors, as is an unknown preset
        space = {field_path(k): v for k, v in load_space(space_file).items()} if space_file else {}
        for item in params:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                fail(f"--param {item!r}: write it as section.field=value[,value...], e.g. train.clip_norm=0.5,1")
            space[field_path(key)] = parse_values(text)
        # A URL with its password stays in this process; anything else reads as the flow reads it (secret:NAME).
        storage = given if given and has_password(given) and not is_masked(given) else study_storage(given)
        spec = study_spec(space, preset, fixed, storage=storage, **settings)
        check_storage(spec)  # reads the study, writes nothing: the flow writes once the sweep runs
    except ValueError as exc:
        fail(str(exc))
    return spec


def _start(spec: Any, preset: str, cluster_address: str | None, workers: int | None, use_gpus: bool) -> Any:
    """Prefect's API, the Dask cluster's task runner and the sweep's first lines (how many trials of which preset
    on which cluster, where Prefect and MLflow are, and the study); returns the sweep flow to run on that cluster.
    A stop meanwhile exits saying nothing was trained."""
    handle_stop_signals(SWEEP_STOP_SECONDS)  # SIGINT, SIGTERM: one line, exit 130 or 143, the cluster stopped
    with launch.exit_on_stop(before_start):
        temporary_api = launch.start_prefect_api()  # boots while the imports below load, as for `deeprnn run`
        from deeprnn.flows.sweep_flow import sweep_lm  # Prefect, MLflow and Dask load once the input is good
        from deeprnn.ops.cluster import dask_task_runner

        launch.wait_for_api(temporary_api, preload=False)
        runner = dask_task_runner(cluster_address, workers, use_gpus=use_gpus)
        where = cluster_address or f"a new local Dask cluster ({workers or 'default'} workers)"
        trials = len(spec.points()) or spec.max_trials or DEFAULT_TRIALS
        console.print(f"deeprnn sweep: {trials} trials of preset [bold]{preset}[/bold] on {where}")
        # The workers report to the same API: PREFECT_API_URL (the temporary server's, when it runs) reaches local
        # workers through the environment and every worker through the settings the task runner sends along.
        launch.announce_services(None)
        print_line(f"Optuna study {spec.name!r} in {spec.shown_storage} (sampler {spec.sampler}, pruner {spec.pruner})")
        launch.mark_orphaned_runs()
    return sweep_lm.with_options(task_runner=runner)


def _parameters() -> list[inspect.Parameter]:
    """One comma-separated option per dimension of ``DIMENSIONS`` (``--cell``, ``--num-layers``, ...), then
    `deeprnn run`'s options of the fields fixed for every trial (``--epochs``, ``--device``, ...)."""
    dims = []
    for name, (_, help_text) in DIMENSIONS.items():
        option = typer.Option(None, "--" + name.replace("_", "-"), help=help_text)
        dims.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[str]))
    fixed = [p for p in options.override_parameters(("data", "train")) if p.name in FIXED]
    for parameter in fixed:
        parameter.default.help += " The same for every trial (GPU trials get one GPU each)."
    return dims + fixed


# Typer reads the signature: the dimension options, then the fields fixed for every trial.
options.with_options(sweep, _parameters())
