"""What the flows' parameters look like in Prefect: titles for the dashboard's form (the fields several flows
take, declared once), and the preset sections each deployment in ``prefect.yaml`` is pre-filled with.

The flows take the configuration's own section models (``DataConfig``, ``ModelConfig``, ``TrainConfig``,
``SampleConfig``) as parameters, so the form shows each field with its title, description, bounds and the
deployment's value. A section left empty (None) is the preset's; a section given replaces the fields it sets
(all of them, as the form sends it) and keeps the preset's value for any it leaves out.

``python -m deeprnn.flows.parameters d2l-9.3`` prints a preset's sections as the YAML a deployment's ``parameters``
hold; ``tests/e2e/test_deployments.py`` fails when ``prefect.yaml`` and the presets disagree.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Annotated, Any, Optional, cast

import yaml
from pydantic import Field
from pydantic.fields import FieldInfo

from deeprnn.config import (
    PRESETS,
    REGISTERED_MODEL_PATTERN,
    SECTIONS,
    DataConfig,
    ModelConfig,
    PresetName,
    SampleConfig,
    TrainConfig,
    preset_config,
)


def form_field(title: str, **constraints: Any) -> FieldInfo:
    """Metadata for a flow parameter, used as ``Annotated[T, form_field("Title", le=...)]``.

    Prefect titles every flow parameter with its Python name; a title in ``json_schema_extra`` is applied
    last, so the dashboard's form shows this one. Constraints (``ge``, ``max_length``, ...) become the
    form's bounds. Descriptions come from the flow's docstring (its ``Args:`` section).
    """
    return cast(FieldInfo, Field(json_schema_extra={"title": title}, **constraints))


# The form's fields that more than one flow takes, declared once: ``name: PresetField = "d2l-9.3"`` in a flow's
# signature. Each flow keeps its own default and its own description (its docstring's ``Args:``).
PresetField = Annotated[PresetName, form_field("Preset")]
DataField = Annotated[Optional[DataConfig], form_field("Data")]
ModelField = Annotated[Optional[ModelConfig], form_field("Model")]
TrainField = Annotated[Optional[TrainConfig], form_field("Training")]
SampleField = Annotated[Optional[SampleConfig], form_field("Samples")]
SpaceField = Annotated[dict[str, Any], form_field("Search space")]
ExperimentField = Annotated[Optional[str], form_field("MLflow experiment", min_length=1, max_length=256)]
RunsDirField = Annotated[str, form_field("Checkpoint folder", min_length=1, max_length=1024)]
RegisterBestField = Annotated[bool, form_field("Register the best model")]
RegisteredModelField = Annotated[Optional[str], form_field("Registered model", pattern=REGISTERED_MODEL_PATTERN)]


def preset_sections(
    preset: str, overrides: dict[str, dict[str, Any]] | None = None, sections: Iterable[str] = SECTIONS
) -> dict[str, dict[str, Any]]:
    """The preset's complete ``sections`` (with ``overrides`` applied) as JSON values: a deployment's form.

    ``sections`` names the sections to give (all of ``config.SECTIONS``, in their order, by default)."""
    config = preset_config(preset, overrides)
    return {name: getattr(config, name).model_dump(mode="json") for name in sections}


def main(argv: list[str]) -> int:
    """Print each named preset's sections as the ``parameters`` YAML of its deployment."""
    names = argv or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        print(f"error: unknown preset {unknown[0]!r}; choose one of: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    for name in names:
        block = {"parameters": {"preset": name, **preset_sections(name)}}
        print(f"# {name}\n" + yaml.safe_dump(block, sort_keys=False, allow_unicode=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
