"""Validated configuration: one pydantic model per stage, defaults are the book's (D2L 9.3). `RunConfig` is
what a run uses, logs to MLflow and stores in every checkpoint; users pick a named preset (`PRESETS`) and change
a few fields of its sections (`resolve`). The presets are defined here once; the forms and the CLI build on them.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, field_validator, model_validator

from deeprnn.data.urls import redact_url
from deeprnn.durations import MAX_BUDGET, MIN_BUDGET, parse_budget
from deeprnn.presets import PRESET_VALUES, merge

D2L_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
D2L_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"

CellType = Literal["lstm", "gru", "rnn"]
OptimizerName = Literal["sgd", "adam", "adamw"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PresetName = Literal["d2l-9.3", "full-book", "smoke", "text"]
PRESETS: tuple[str, ...] = tuple(PRESET_VALUES)
# Names a registered model may take: letters, digits, '.', '_' and '-', as in models:/<name>@champion.
REGISTERED_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$"
# The book's sample prefixes: the default for the book's corpus (any other text gets prefixes drawn from it).
BOOK_PREFIXES = ["time traveller", "traveller"]
# What ``model.size = "auto"`` decides (``deeprnn.sizing``); a value the user gives for one of them turns it off.
SIZED_FIELDS = (("model", "num_layers"), ("model", "num_hiddens"), ("model", "embedding_dim"), ("model", "dropout"))
# Bounds several fields share: counts of epochs or evaluations, optimizer steps (a budget, a period; a share of
# the plan), held-out tokens, layer widths.
Count = Annotated[int, Field(ge=1, le=100_000)]
Steps = Annotated[int, Field(ge=1, le=10**12)]
PlannedSteps = Annotated[int, Field(ge=0, le=10**9)]
HeldOutTokens = Annotated[int, Field(ge=2, le=10**12)]
Width = Annotated[int, Field(ge=1, le=8192)]


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(_Section):
    """Where the corpus comes from and how it is cut into tokens and splits."""

    # The one place credentials leave the corpus URL: its JSON form, which is what leaves the process (MLflow
    # params, checkpoints, config.json, --json). Python values keep them for the download.
    url: Annotated[str, PlainSerializer(redact_url, when_used="json")] = Field(
        D2L_URL,
        title="Corpus URL or path",
        description="http(s):// or file:// URL, or a local path, of a UTF-8 text file. Default: the book's.",
        min_length=1,
        max_length=2048,
    )
    sha1: Optional[str] = Field(
        None,
        title="Expected SHA-1",
        description="40 hex digits. Empty: the book's hash for the book's URL, no check for any other source.",
        pattern=r"^[0-9a-fA-F]{40}$",
    )
    token: Literal["char", "word"] = Field("char", title="Token unit", description="Characters (the book) or words.")
    normalize: Literal["d2l", "lower", "none"] = Field(
        "d2l",
        title="Normalization",
        description="d2l: the book's rule (letters a-z only, lower-cased, one space between words, lines joined). "
        "lower: every character kept, lower-cased. none: every character kept exactly (case, punctuation, digits, "
        "newlines), for your own text in any language.",
    )
    min_freq: int = Field(
        0, title="Minimum frequency", description="Tokens rarer than this map to <unk>.", ge=0, le=1_000_000
    )
    reserved_tokens: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list,
        title="Reserved tokens",
        description="Extra tokens placed right after <unk>.",
        max_length=64,
    )
    max_tokens: Optional[int] = Field(
        10000,
        title="Training tokens",
        description="Train on the first N tokens only (the book: 10000). 0 or empty: the whole training split.",
        ge=0,
        le=1_000_000_000,
    )
    val_fraction: float = Field(
        0.0,
        title="Validation fraction",
        description="Share of the corpus, before the test part, used to choose the best epoch. 0: keep the last epoch.",
        ge=0.0,
        le=0.5,
    )
    test_fraction: float = Field(
        0.1,
        title="Held-out test fraction",
        description="Share at the end of the corpus never trained on; its perplexity is reported.",
        gt=0.0,
        le=0.5,
    )

    def expected_sha1(self) -> str | None:
        """The hash the download must match: the user's, else the book's for the book's own URL."""
        if self.sha1:
            return self.sha1.lower()
        return D2L_SHA1 if self.url == D2L_URL else None

    @model_validator(mode="after")
    def _splits_leave_training_text(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) + test_fraction ({self.test_fraction}) must leave at least "
                "10% of the corpus for training"
            )
        return self


class ModelConfig(_Section):
    """The recurrent language model: cell type, depth, width."""

    size: Literal["fixed", "auto"] = Field(
        "fixed",
        title="Model size",
        description="fixed: the layers, width, embedding and dropout below. auto (the text preset): chosen for the "
        "text and the time budget when the data is known (about as many weights as training tokens, and as many "
        "as the budget can train); giving any of them fixes the size.",
    )

    cell: CellType = Field("lstm", title="Cell type", description="lstm (the book), gru or rnn (tanh).")
    num_hiddens: Width = Field(256, title="Hidden units", description="Width of each recurrent layer.")
    num_layers: int = Field(2, title="Layers", description="Stacked recurrent layers (the book: 2).", ge=1, le=16)
    dropout: float = Field(
        0.0, title="Dropout", description="Dropout between recurrent layers, in [0, 1).", ge=0.0, lt=1.0
    )
    embedding_dim: Optional[Width] = Field(
        None,
        title="Embedding size",
        description="Learned embedding of this size. Empty: one-hot input, as in the book.",
    )


class TrainConfig(_Section):
    """The training loop: batching, optimizer, schedule, device and bookkeeping."""

    batch_size: int = Field(32, title="Batch size", description="Sequences per minibatch.", ge=1, le=65536)
    num_steps: int = Field(35, title="Steps", description="Time steps per minibatch (truncated BPTT).", ge=1, le=4096)
    partition: Literal["sequential", "random"] = Field(
        "sequential",
        title="Partitioning",
        description="sequential: state carried across minibatches (the book); random: state reset per minibatch.",
    )
    epochs: Count = Field(500, title="Epochs", description="Passes over the training tokens.")
    optimizer: OptimizerName = Field("sgd", title="Optimizer", description="sgd (the book), adam or adamw.")
    lr: float = Field(2.0, title="Learning rate", description="Peak learning rate.", gt=0.0, le=100.0)
    weight_decay: float = Field(
        0.0, title="Weight decay", description="L2 (sgd, adam) or decoupled (adamw).", ge=0.0, le=1.0
    )
    lr_schedule: Literal["constant", "cosine", "warmup-cosine", "warmup-stable-decay"] = Field(
        "constant",
        title="LR schedule",
        description="constant (the book); cosine: decay to 0 over the epochs; warmup-cosine: linear warm-up over "
        "warmup_steps, then cosine decay to a tenth of the peak over the planned steps (epochs, max_steps or the "
        "time budget, whichever ends first); warmup-stable-decay: the same warm-up, the peak until the last 20% "
        "of the plan, and that cosine decay over it.",
    )
    warmup_steps: PlannedSteps = Field(
        100,
        title="Warm-up steps",
        description="Steps of linear warm-up (warmup-cosine; at most a tenth of the planned steps).",
    )
    clip_norm: Optional[float] = Field(
        1.0,
        title="Gradient clip",
        description="Clip the global gradient norm to this (the book: 1). Empty: off.",
        gt=0.0,
        le=1e6,
    )
    seed: int = Field(0, title="Seed", description="Seeds weights, minibatch offsets, dropout.", ge=0, le=2**32 - 1)
    device: DeviceName = Field("auto", title="Device", description="auto picks cuda, then mps, then cpu.")
    timeout_minutes: Optional[Count] = Field(
        None,
        title="Training timeout (minutes)",
        description="Fail the training task after this long. Empty: one hour plus one minute per 60,000 training "
        "tokens (epochs x tokens), far above any healthy run.",
    )
    fast: bool = Field(
        True,
        title="Fast path",
        description="Device-resident data, no host syncs, CUDA-graph capture where possible. Off: plain eager loop.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        title="Precision",
        description="Training-step arithmetic. auto: bf16 autocast on CUDA GPUs that support it (about 1.7x faster "
        "steps, same results for the book), fp32 elsewhere. fp32: the book's exact numerics. bf16: CUDA only.",
    )
    eval_every: Count = Field(
        10, title="Evaluate every", description="Held-out perplexity every N epochs (and at the last)."
    )
    log_every: Count = Field(10, title="Log every", description="Progress line every N epochs (and at the last).")
    # Seconds, or "90s", "2m", "1h30m" (the CLI, the form); "off" or None: no budget; 0 and blanks are refused.
    time_budget: Annotated[Optional[float], BeforeValidator(parse_budget)] = Field(
        None,
        title="Time budget (seconds)",
        description="Train for this long (e.g. 90s, 2m, 1h): the steps are planned from the throughput "
        "measured in the first seconds, the learning-rate schedule follows the plan, and training ends on time "
        "with the best validation weights. off (in the form: empty): epochs and max_steps only.",
        ge=MIN_BUDGET,
        le=MAX_BUDGET,
    )
    min_planned_steps: PlannedSteps = Field(
        0,
        title="Steps the budget plans at least",
        description="With a time budget: halve the batch (down to 8 rows) until the budget plans at least this "
        "many optimizer steps at the throughput measured on this device, so that a short budget on a slow device "
        "makes more, smaller steps. 0: keep the batch (giving batch_size keeps it too).",
    )
    patience: Optional[Count] = Field(
        None,
        title="Early-stopping patience",
        description="Stop after this many held-out evaluations in a row without a better perplexity. Empty: never.",
    )
    evaluations: Optional[Count] = Field(
        None,
        title="Evaluations over the plan",
        description="With a time budget or max_steps: spread this many held-out evaluations evenly over the "
        "planned steps (unless eval_every_steps is given). Empty: eval_every only.",
    )
    checkpoint_every_minutes: Optional[float] = Field(
        10.0,
        title="Checkpoint every N minutes",
        description="Save a resumable checkpoint after every N minutes of training, so a crash loses at most "
        "that. Empty or 0: off.",
        ge=0.0,
        le=100000.0,
    )
    max_steps: Optional[Steps] = Field(
        None,
        title="Step budget",
        description="Stop after N optimizer steps in total, also inside an epoch (resumable from there). "
        "Empty: train for the epochs only.",
    )
    eval_every_steps: Optional[Steps] = Field(
        None,
        title="Evaluate every N steps",
        description="Also measure held-out perplexity every N optimizer steps, inside epochs too (MLflow "
        "step_* metrics, step = global step). Empty: per epoch only.",
    )
    checkpoint_every_steps: Optional[Steps] = Field(
        None,
        title="Checkpoint every N steps",
        description="Also save a resumable checkpoint every N optimizer steps, inside epochs too. Empty: per "
        "epoch only.",
    )
    # 1M tokens: above every preset's held-out split on the book (17,058 tokens), so the book's numbers do not
    # change, while an evaluation on a gigabyte corpus stays seconds instead of an hour.
    eval_max_tokens: Optional[HeldOutTokens] = Field(
        1_000_000,
        title="Held-out tokens per evaluation",
        description="Periodic evaluations during training read only the first N held-out tokens (the final "
        "test perplexity still reads the whole test split). Default 1,000,000; a larger N reads more.",
    )
    final_eval_max_tokens: Optional[HeldOutTokens] = Field(
        None,
        title="Held-out tokens of the final evaluation",
        description="The final validation and test perplexities read only the first N tokens of each split "
        "(the results say how many: val_tokens, test_tokens). Empty: the whole splits.",
    )
    checkpoint_every: Optional[Count] = Field(
        None,
        title="Checkpoint every",
        description="Save a resumable checkpoint every N epochs. Empty: at the end only.",
    )


class SampleConfig(_Section):
    """Text generated at the end of a run."""

    prefixes: list[Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=lambda: list(BOOK_PREFIXES),
        title="Prefixes",
        description="Each prefix is continued; the book uses 'time traveller' and 'traveller'. Empty: the starts "
        "of a few lines drawn from the held-out text (the default for any text but the book).",
        min_length=0,
        max_length=32,
    )
    num_tokens: int = Field(
        50,
        title="Tokens to generate",
        description="Tokens appended to each prefix: characters, or words with data.token word.",
        ge=1,
        le=10000,
    )
    temperature: Optional[float] = Field(
        None,
        title="Temperature",
        description="Empty: greedy argmax (the book). Otherwise sample at this temperature.",
        gt=0.0,
        le=100.0,
    )
    top_k: Optional[int] = Field(
        None, title="Top-k", description="Sample only among the k likeliest tokens.", ge=1, le=1_000_000
    )
    seed: int = Field(0, title="Sampling seed", description="Seed of the sampling generator.", ge=0, le=2**32 - 1)

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, values: Any) -> Any:
        # num_tokens was num_chars: configurations, checkpoints and deployments that still say so keep working
        # (over a preset's num_tokens, when the two meet in a merge).
        if isinstance(values, dict) and "num_chars" in values:
            values = {k: v for k, v in values.items() if k != "num_chars"} | {"num_tokens": values["num_chars"]}
        return values

    @field_validator("prefixes")
    @classmethod
    def _non_empty_prefixes(cls, value: list[str]) -> list[str]:
        if any(not p for p in value):
            raise ValueError("every prefix needs at least one character")
        return value


class RunConfig(_Section):
    """The complete configuration of one training run; defaults reproduce D2L section 9.3."""

    preset: PresetName = Field(
        "d2l-9.3", title="Preset", description="The named preset this configuration started from."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    def flat(self) -> dict[str, Any]:
        """Every value as ``section.field -> value`` (JSON types: lists stay lists, None stays None)."""
        sections = self.model_dump(mode="json", exclude={"preset"})
        return {"preset": self.preset} | {f"{s}.{k}": v for s, values in sections.items() for k, v in values.items()}


# The configuration's sections by name, in the order of ``RunConfig``: the CLI's options and the search
# spaces' field paths (``section.field``) are read from these models.
SECTIONS: dict[str, type[_Section]] = dict(data=DataConfig, model=ModelConfig, train=TrainConfig, sample=SampleConfig)


# A section as callers give it: its model (the fields set count), a mapping of fields, or None for none.
Section = BaseModel | Mapping[str, Any] | None


def section_values(section: Section) -> dict[str, Any]:
    """The values a section gives: a model's explicitly set fields, or a mapping's keys; None gives none.

    A section model built from ``{"epochs": 2}`` gives only ``epochs``: the fields it leaves out keep the
    preset's values. A complete section (every field set, as a form sends it) replaces the preset's whole.
    """
    if isinstance(section, BaseModel):
        return section.model_dump(include=set(section.model_fields_set))
    return dict(section or {})


def overrides_dict(
    data: Section = None, model: Section = None, train: Section = None, sample: Section = None
) -> dict[str, dict[str, Any]]:
    """The sections' given values (``section_values``) as ``{section: {field: value}}``, empty ones left out."""
    given = zip(SECTIONS, map(section_values, (data, model, train, sample)))
    return {key: values for key, values in given if values}


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The named preset, with ``overrides`` (nested ``{section: {field: value}}``) applied and validated.

    Raises ``ValueError`` naming the valid presets for an unknown name, and pydantic's ``ValidationError``
    (naming the field) for a bad override.
    """
    if name not in PRESET_VALUES:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    given = overrides or {}
    # A copy: the rules below must change neither the preset nor the caller's overrides.
    merged = copy.deepcopy(merge(PRESET_VALUES[name], given)) | {"preset": name}
    if any(field in given.get(section, {}) for section, field in SIZED_FIELDS) and "size" not in given.get("model", {}):
        merged.setdefault("model", {})["size"] = "fixed"  # the user's shape, not the sized one
    if "batch_size" in given.get("train", {}) and "min_planned_steps" not in given["train"]:
        merged.setdefault("train", {})["min_planned_steps"] = 0  # the user's batch, not the sized one
    url = merged.get("data", {}).get("url", D2L_URL)
    if url != D2L_URL and "prefixes" not in given.get("sample", {}):
        merged.setdefault("sample", {})["prefixes"] = []  # drawn from the held-out text, not the book's
    return RunConfig.model_validate(merged)


def default_preset(url: str | None) -> str:
    """The preset a run takes when none is named: the book's for the book's corpus, ``text`` for any other."""
    return "d2l-9.3" if url is None or url == D2L_URL else "text"


def resolve(
    preset: str, data: Section = None, model: Section = None, train: Section = None, sample: Section = None
) -> RunConfig:
    """The preset with each given section's values (see ``section_values``) in place of its own, validated."""
    return preset_config(preset, overrides_dict(data, model, train, sample))
