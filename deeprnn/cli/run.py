"""``deeprnn run`` (the training flow) and ``deeprnn prepare`` (the token cache, without training)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Optional

import typer

from deeprnn.cli import launch, options, preflight
from deeprnn.cli.output import console, fail, print_result, print_rows, warn, write_json
from deeprnn.config import PRESETS, RunConfig
from deeprnn.training.stop_signals import handle_stop_signals


def stopped(exc: KeyboardInterrupt) -> str:
    """What a stopped run kept, in one line: the MLflow run, its checkpoint and the command that continues it."""
    name = getattr(exc, "signal_name", "SIGINT")
    run_id, kept = getattr(exc, "run_id", None), getattr(exc, "checkpoint", None)
    if run_id is None:
        return f"by {name} before the MLflow run was opened: nothing was trained or changed"
    if kept is None:
        return (
            f"by {name}: MLflow run {run_id} is marked KILLED; it stopped before its first checkpoint, so there "
            "is nothing to resume"
        )
    return (
        f"by {name}: MLflow run {run_id} is marked KILLED; its checkpoint is kept ({kept}): continue with "
        f"deeprnn run --resume {run_id}"
    )


def run(
    preset: Optional[str] = typer.Option(
        None,
        "--preset",
        help=f"Named preset: {', '.join(PRESETS)} (default: d2l-9.3 for the book's corpus, text for your own).",
    ),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        metavar="RUN_ID",
        help="Continue this MLflow run from its last checkpoint, with the configuration stored in it "
        "(--epochs may extend it; --device, --checkpoint-every, --log-every may change).",
    ),
    epochs: Optional[int] = None,  # the configuration's option, placed here by ``options.with_options``
    experiment: options.Experiment = None,
    runs_dir: str = typer.Option("runs", "--runs-dir", help="Local folder for checkpoints, one subfolder per run."),
    json_out: options.JsonOut = None,
    registered_model: options.RegisteredModel = None,
    **values: Any,
) -> None:
    """Run the training flow: download, vocabulary, train, evaluate, generate, log to MLflow."""
    overrides = options.overrides({**values, "epochs": epochs})
    _check_resume(resume, preset)
    options.check_registered_model(registered_model)
    config = options.resolve_or_exit(preset, overrides)  # for a resume, this only validates the overrides
    device = _preflight(config, overrides, resume, experiment, runs_dir)
    _announce(config, resume, chosen=preset is None)  # the first line, before anything prints

    handle_stop_signals()  # SIGINT, SIGTERM: stop at a safe point, checkpointed, with one line
    with launch.exit_on_stop(stopped):
        temporary_api = launch.start_prefect_api()  # boots in its own process while the flow's imports load here
        from deeprnn.flows.train_flow import train_lm  # Prefect and MLflow load only once the input is known to be good

        launch.init_device(device)
        launch.wait_for_api(temporary_api, preload=True)
        ready_at = time.time()  # imports done and the Prefect API answering
        launch.announce_services(temporary_api)
        launch.mark_orphaned_runs(runs_dir)
    # A new run gets the validated sections whole; a resumed run its stored configuration, which the options may
    # only restate or extend (checked by the resume task).
    sections: dict[str, Any] = overrides if resume else options.complete_sections(config)
    tracking = dict(experiment=experiment, runs_dir=runs_dir, resume_run_id=resume, registered_model=registered_model)
    result = launch.invoke(lambda: train_lm(preset=config.preset, **sections, **tracking), stopped)
    result = replace(result, timings=replace(result.timings, cli_ready_at=ready_at, flow_returned_at=time.time()))
    with launch.exit_on_stop(f"after MLflow run {result.run_id} FINISHED: everything it logged is kept"):
        print_result(result)
        write_json(result.as_record(), json_out)


def _check_resume(resume: str | None, preset: str | None) -> None:
    """A ``--resume`` id must look like an MLflow run id, and a resumed run keeps its own preset."""
    if resume is None:
        return
    from deeprnn.training.resume import ResumeError, check_run_id

    try:
        check_run_id(resume)
    except ResumeError as exc:
        fail(f"--resume: {exc}")
    if preset is not None:
        fail("--preset cannot be combined with --resume: a resumed run keeps its own configuration")


def _preflight(
    config: RunConfig, overrides: dict[str, Any], resume: str | None, experiment: str | None, runs_dir: str
) -> str:
    """What can be refused in milliseconds, before Prefect or MLflow start: the corpus, the device, the run
    (absent, another experiment's, without a checkpoint, or finished with nothing left to train). Returns the
    device the run asks for."""
    # A resumed run's settings are its own: only what the options change is checked here.
    given = config.model_dump() if resume is None else overrides
    device = given.get("train", {}).get("device", "auto")
    preflight.check_source(given.get("data", {}).get("url"))
    preflight.check_device(device)
    if resume is not None:
        preflight.check_resume(resume, experiment, runs_dir, overrides.get("train", {}))
    return device


def _announce(config: RunConfig, resume: str | None, chosen: bool) -> None:
    """The run's first line: what a new run will do (the preset, and why when it was chosen for the user, the
    budget), or which run it resumes."""
    # soft_wrap: long lines are left to the terminal to wrap, so a URL or run id is never broken in two.
    if resume is not None:
        console.print(f"deeprnn: resuming MLflow run [bold]{resume}[/bold] from its last checkpoint", soft_wrap=True)
        return
    from deeprnn.durations import format_duration

    t = config.train
    why = ""
    if chosen and config.preset == "text":
        why = " (your own text: every character kept, the model sized to it; --preset d2l-9.3 for the book's)"
    bounds = [f"{t.epochs} epochs"] if t.time_budget is None else [f"time budget {format_duration(t.time_budget)}"]
    if t.max_steps is not None:
        bounds.append(f"{t.max_steps:,} steps")
    if t.patience is not None:
        bounds.append(f"early stopping after {t.patience} evaluations without progress")
    plan = f"preset [bold]{config.preset}[/bold]{why}, {', '.join(bounds)}, device {t.device}"
    console.print(f"deeprnn: {plan}", highlight=False, soft_wrap=True)


def prepare(
    preset: Optional[str] = typer.Option(
        None,
        "--preset",
        help=f"Named preset whose data settings to start from: {', '.join(PRESETS)} (default: d2l-9.3 for "
        "the book's corpus, text for your own).",
    ),
    json_out: options.JsonOut = None,
    **values: Any,
) -> None:
    """Download and tokenize a corpus into the token cache (once per corpus and settings), and say what it holds."""
    config = options.resolve_or_exit(preset, options.overrides(values))
    preflight.check_source(config.data.url)
    from deeprnn.data.download import DownloadError, fetch_corpus
    from deeprnn.data.prepare import PrepareError, dropped_letters_warning, prepared_record, split_sizes
    from deeprnn.data.prepare import prepare as prepare_corpus

    started = time.perf_counter()
    try:
        corpus = fetch_corpus(config.data.url, config.data.expected_sha1())
        prepared = prepare_corpus(corpus, config.data)
    except (DownloadError, PrepareError) as exc:
        fail(str(exc), 1)
    seconds = time.perf_counter() - started
    warn(dropped_letters_warning(prepared))
    tokenized = "no: served from the cache" if prepared.cache_hit else f"yes, in {prepared.build_seconds:.1f} s"
    rows = {
        "token cache": str(prepared.folder),
        "tokenized now": tokenized,
        "corpus sha1": corpus.sha1,
        "settings": ", ".join(f"{k} {v}" for k, v in prepared.settings.describe().items()),
        "vocabulary": f"{prepared.vocab_size:,} tokens (ids stored as {prepared.dtype})",
        "tokens": f"{prepared.num_tokens:,}",
        **{f"{name} tokens": f"{count:,}" for name, count in split_sizes(prepared, config.data).items()},
        "time": f"{seconds:.1f} s",
    }
    print_rows(f"prepared {config.flat()['data.url']}", rows)  # the URL without credentials
    write_json({**prepared_record(prepared, config.data), "seconds": seconds}, json_out)


# Typer reads the signatures: one keyword option per configuration field (data fields only for prepare).
options.with_options(run, options.override_parameters())
options.with_options(prepare, options.override_parameters(("data",)))
