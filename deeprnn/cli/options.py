"""One ``--option`` per configuration field, generated from the pydantic models, so the CLI, the Prefect form
and the configuration can never disagree; options grouped back into overrides and validated."""

from __future__ import annotations

import inspect
import re
import typing
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from pydantic import BaseModel, BeforeValidator, ValidationError

from deeprnn.cli.output import fail
from deeprnn.config import REGISTERED_MODEL_PATTERN, SECTIONS, RunConfig, default_preset, preset_config, resolve
from deeprnn.durations import DurationError, parse_budget

# Option names that differ from the field name (clashes, or names the book's users expect).
RENAMES = {
    ("data", "url"): "data_url",
    ("data", "sha1"): "data_sha1",
    ("data", "reserved_tokens"): "reserved_token",
    ("sample", "prefixes"): "prefix",
    ("sample", "seed"): "sample_seed",
}

# Former option names, hidden, so that scripts that still use them keep working: old name -> the name now.
ALIASES = {"num_chars": "num_tokens"}

Command = TypeVar("Command", bound=Callable[..., None])


def _cli_type(annotation: Any) -> tuple[Any, str, str | None]:
    """A type Typer understands for a field's annotation, a note on allowed values for the help, and the
    metavar that shows what to type (the choices themselves for a few named values)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) is typing.Union and args else annotation
    if typing.get_origin(base) is Annotated:  # an optional bounded type (config.Count, ...)
        base = typing.get_args(base)[0]
    if typing.get_origin(base) is typing.Literal:
        return Optional[str], "", "[" + "|".join(map(str, typing.get_args(base))) + "]"
    if typing.get_origin(base) is list:
        return Optional[list[str]], " Repeat the option for several values.", None
    return Optional[base], "", None  # the help names the type (``help_format.METAVARS``)


def default_text(value: Any) -> str:
    """A configuration value as the help shows a default: lists comma-separated, None as 'unset'."""
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# The book's preset: the help shows its value of every field, beside the words "the preset's".
BOOK_PRESET = "d2l-9.3"


# CLI parameter name -> (section, field) for every configuration field.
OPTION_FIELDS = {RENAMES.get((s, name), name): (s, name) for s, cls in SECTIONS.items() for name in cls.model_fields}


def override_parameters(sections: tuple[str, ...] = tuple(SECTIONS)) -> list[inspect.Parameter]:
    """One keyword ``typer.Option`` per field of the configuration ``sections``."""
    params = []
    book, text = (preset_config(name).model_dump() for name in (BOOK_PRESET, "text"))
    for cli_name, (section, name) in OPTION_FIELDS.items():
        if section not in sections:
            continue
        info = SECTIONS[section].model_fields[name]
        typ, note, metavar = _cli_type(info.annotation)
        if any(isinstance(m, BeforeValidator) for m in info.metadata):  # parsed from text by the model itself
            typ, note, metavar = Optional[str], "", "DURATION"
        flag = "--" + cli_name.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if typ is Optional[bool] else flag
        # The option's own default is None (the preset's value applies): say so, with the book's value.
        default = f"{BOOK_PRESET}: {default_text(book[section][name])}"
        if text[section][name] != book[section][name]:
            default += f", text: {default_text(text[section][name])}"
        if (section, name) == ("data", "url"):
            default = "the book"
        described = f"[{section}] {info.description or ''}{note}  [default: the preset's; {default}]"
        option = typer.Option(None, decl, help=described, show_default=False, metavar=metavar)
        params.append(inspect.Parameter(cli_name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=typ))
    for alias, cli_name in ALIASES.items():  # a former name: hidden, of the same type as the name now
        hidden = typer.Option(None, "--" + alias.replace("_", "-"), hidden=True)
        params += [p.replace(name=alias, default=hidden) for p in params if p.name == cli_name]
    return params


def with_options(command: Command, extra: list[inspect.Parameter]) -> Command:
    """``command`` with its ``**options`` replaced by the ``extra`` keyword options, as Typer reads a signature
    (an extra option of the same name as a parameter of the command's own takes that parameter's place)."""
    signature = inspect.signature(command, eval_str=True)  # real types: the module uses postponed annotations
    generated = {p.name: p for p in extra}
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    parameters = [generated.pop(p.name, p).replace(kind=p.kind) for p in own] + list(generated.values())
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]  # read by Typer
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command


def overrides(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group the options the user gave into ``{section: {field: value}}``; a ``--time-budget`` that is neither a
    duration nor ``off`` (``0``, a blank, ``1ms``, ``2x``) exits 2 in one line."""
    out: dict[str, dict[str, Any]] = {}
    # A former name first: the option's name now, given too, wins over it.
    for cli_name, value in sorted(values.items(), key=lambda item: item[0] not in ALIASES):
        field = OPTION_FIELDS.get(ALIASES.get(cli_name, cli_name))
        if value is not None and field is not None and value != []:
            out.setdefault(field[0], {})[field[1]] = value
    try:  # refused here in one line naming what it takes: the configuration's message would span lines
        parse_budget(out.get("train", {}).get("time_budget"))
    except DurationError as exc:
        fail(f"--time-budget: {exc}")
    return out


def resolve_or_exit(preset: str | None, values: dict[str, dict[str, Any]]) -> RunConfig:
    """The preset (default: d2l-9.3 for the book's corpus, text for any other) with the options' overrides,
    validated; a bad value exits 2 naming it (its option's name, as the pydantic error's location)."""
    try:
        return resolve(preset or default_preset(values.get("data", {}).get("url")), **values)
    except ValidationError as exc:
        by_field = {v: k for k, v in OPTION_FIELDS.items()}
        lines = ["invalid configuration:"]
        for e in exc.errors():
            loc = tuple(str(p) for p in e["loc"])
            key = by_field.get(loc[:2])
            where = "--" + key.replace("_", "-") if key else ".".join(loc) or "configuration"
            lines.append(f"  {where}: {e['msg']}")
        fail("\n".join(lines))
    except ValueError as exc:  # an unknown preset
        fail(str(exc))


def complete_sections(config: RunConfig) -> dict[str, BaseModel]:
    """The resolved configuration's sections, each with every field set: handed to a flow, each replaces its
    preset's section whole (``deeprnn.config.section_values``), so the flow runs exactly what the command
    validated and printed, and resolves nothing again."""
    return {name: cls.model_validate(getattr(config, name).model_dump()) for name, cls in SECTIONS.items()}


def check_registered_model(name: str | None) -> None:
    """Refuse a registered model name that MLflow's ``models:/<name>@alias`` URIs could not carry."""
    if name is not None and not re.fullmatch(REGISTERED_MODEL_PATTERN, name):
        fail(f"--registered-model {name!r}: use letters, digits, '.', '_' and '-' (at most 256)")


# Options more than one command takes, declared once (Typer reads ``Annotated`` metadata).
JsonOut = Annotated[Optional[str], typer.Option("--json", help="Also write the result as JSON to this file.")]
Experiment = Annotated[
    Optional[str],
    typer.Option(
        "--experiment",
        metavar="NAME",
        help="MLflow experiment. Default: deeprnn-train for the book's corpus, deeprnn-<file>-<sha1 prefix> for "
        "any other text (a sweep: deeprnn-sweep).",
    ),
]
RegisteredModel = Annotated[
    Optional[str],
    typer.Option(
        "--registered-model",
        metavar="NAME",
        help="MLflow registered model to add the model to (default: deeprnn-lm for the book's corpus, "
        "deeprnn-<file>-<sha1 prefix> for any other text).",
    ),
]
