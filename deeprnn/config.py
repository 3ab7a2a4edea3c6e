"""Validated configuration: one pydantic model per stage, defaults are the book's (D2L 9.3). `RunConfig` is
what a run uses, logs to MLflow and stores in every checkpoint; users pick a named preset (`PRESETS`) and change
a few fields of its sections (`resolve`). The presets are defined here once; the forms and the CLI build on them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator, model_validator

from deeprnn.urls import redact_url

D2L_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
D2L_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"

CellType = Literal["lstm", "gru", "rnn"]
OptimizerName = Literal["sgd", "adam", "adamw"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PresetName = Literal["d2l-9.3", "full-book", "smoke"]
_SHA1_RE = re.compile(r"^[0-9a-fA-F]{40}$")
# Names a registered model may take: letters, digits, '.', '_' and '-', as in models:/<name>@champion.
REGISTERED_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,255}$"
# The one place credentials leave the corpus URL: its JSON form, which is what leaves the process (MLflow
# params, checkpoints, config.json, --json). Python values keep them for the download.
CorpusURL = Annotated[str, PlainSerializer(redact_url, when_used="json")]


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(_Section):
    """Where the corpus comes from and how it is cut into tokens and splits."""

    url: CorpusURL = Field(
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

    cell: CellType = Field("lstm", title="Cell type", description="lstm (the book), gru or rnn (tanh).")
    num_hiddens: int = Field(256, title="Hidden units", description="Width of each recurrent layer.", ge=1, le=8192)
    num_layers: int = Field(2, title="Layers", description="Stacked recurrent layers (the book: 2).", ge=1, le=16)
    dropout: float = Field(
        0.0, title="Dropout", description="Dropout between recurrent layers, in [0, 1).", ge=0.0, lt=1.0
    )
    embedding_dim: Optional[int] = Field(
        None,
        title="Embedding size",
        description="Learned embedding of this size. Empty: one-hot input, as in the book.",
        ge=1,
        le=8192,
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
    epochs: int = Field(500, title="Epochs", description="Passes over the training tokens.", ge=1, le=100000)
    optimizer: OptimizerName = Field("sgd", title="Optimizer", description="sgd (the book), adam or adamw.")
    lr: float = Field(2.0, title="Learning rate", description="Peak learning rate.", gt=0.0, le=100.0)
    weight_decay: float = Field(
        0.0, title="Weight decay", description="L2 (sgd, adam) or decoupled (adamw).", ge=0.0, le=1.0
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", title="LR schedule", description="constant (the book) or cosine decay to 0 over the epochs."
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
    timeout_minutes: Optional[int] = Field(
        None,
        title="Training timeout (minutes)",
        description="Fail the training task after this long. Empty: one hour plus one minute per 60,000 training "
        "tokens (epochs x tokens), far above any healthy run.",
        ge=1,
        le=100_000,
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
    eval_every: int = Field(
        10, title="Evaluate every", description="Held-out perplexity every N epochs (and at the last).", ge=1, le=100000
    )
    log_every: int = Field(
        10, title="Log every", description="Progress line every N epochs (and at the last).", ge=1, le=100000
    )
    max_steps: Optional[int] = Field(
        None,
        title="Step budget",
        description="Stop after N optimizer steps in total, also inside an epoch (resumable from there). "
        "Empty: train for the epochs only.",
        ge=1,
        le=10**12,
    )
    eval_every_steps: Optional[int] = Field(
        None,
        title="Evaluate every N steps",
        description="Also measure held-out perplexity every N optimizer steps, inside epochs too (MLflow "
        "step_* metrics, step = global step). Empty: per epoch only.",
        ge=1,
        le=10**12,
    )
    checkpoint_every_steps: Optional[int] = Field(
        None,
        title="Checkpoint every N steps",
        description="Also save a resumable checkpoint every N optimizer steps, inside epochs too. Empty: per "
        "epoch only.",
        ge=1,
        le=10**12,
    )
    # 1M tokens: above every preset's held-out split on the book (17,058 tokens), so the book's numbers do not
    # change, while an evaluation on a gigabyte corpus stays seconds instead of an hour.
    eval_max_tokens: Optional[int] = Field(
        1_000_000,
        title="Held-out tokens per evaluation",
        description="Periodic evaluations during training read only the first N held-out tokens (the final "
        "test perplexity still reads the whole test split). Default 1,000,000; a larger N reads more.",
        ge=2,
        le=10**12,
    )
    final_eval_max_tokens: Optional[int] = Field(
        None,
        title="Held-out tokens of the final evaluation",
        description="The final validation and test perplexities read only the first N tokens of each split "
        "(the results say how many: val_tokens, test_tokens). Empty: the whole splits.",
        ge=2,
        le=10**12,
    )
    checkpoint_every: Optional[int] = Field(
        None,
        title="Checkpoint every",
        description="Save a resumable checkpoint every N epochs. Empty: at the end only.",
        ge=1,
        le=100000,
    )


class SampleConfig(_Section):
    """Text generated at the end of a run."""

    prefixes: list[Annotated[str, Field(max_length=1000)]] = Field(
        default_factory=lambda: ["time traveller", "traveller"],
        title="Prefixes",
        description="Each prefix is continued; the book uses 'time traveller' and 'traveller'.",
        min_length=1,
        max_length=32,
    )
    num_chars: int = Field(
        50, title="Tokens to generate", description="Tokens appended to each prefix.", ge=1, le=10000
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
        out: dict[str, Any] = {"preset": self.preset}
        for section in SECTIONS:
            for key, value in getattr(self, section).model_dump(mode="json").items():
                out[f"{section}.{key}"] = value
        return out


# The configuration's sections by name, in the order of ``RunConfig``: the CLI's options and the search
# spaces' field paths (``section.field``) are read from these models.
SECTIONS: dict[str, type[_Section]] = dict(data=DataConfig, model=ModelConfig, train=TrainConfig, sample=SampleConfig)


def _presets() -> dict[str, dict[str, Any]]:
    """Each preset as overrides of the book's defaults (kept as data so it reads like a parameter file)."""
    return {
        # The book, D2L 9.3: every default above.
        "d2l-9.3": {},
        # The whole book, split 80/10/10, with settings that generalize instead of memorizing 10k characters.
        # Chosen with bench/tune_full_book.py among 12 candidates (bench/results/): on an H200, validation
        # perplexity 4.09 at epoch 15, test 4.39, in 7 s.
        "full-book": {
            "data": {"max_tokens": None, "val_fraction": 0.1, "test_fraction": 0.1},
            "model": {"num_layers": 3, "num_hiddens": 512, "dropout": 0.5, "embedding_dim": 64},
            "train": {
                "batch_size": 32,
                "num_steps": 128,
                "epochs": 30,
                "optimizer": "adamw",
                "lr": 3e-3,
                "weight_decay": 0.05,
                "lr_schedule": "cosine",
                "precision": "fp32",  # tuned and measured in fp32
                "eval_every": 1,
                "log_every": 1,
            },
        },
        # Seconds on a CPU: a tiny model over a sliver of the book, for tests and first contact.
        "smoke": {
            "data": {"max_tokens": 2000},
            "model": {"num_hiddens": 32},
            "train": {
                "batch_size": 8,
                "num_steps": 16,
                "epochs": 3,
                "lr": 1.0,
                "eval_every": 1,
                "log_every": 1,
                # Seconds whatever the corpus: a large text is not read whole at every evaluation.
                "eval_max_tokens": 10_000,
                "final_eval_max_tokens": 20_000,
            },
            "sample": {"num_chars": 20},
        },
    }


PRESETS: tuple[str, ...] = ("d2l-9.3", "full-book", "smoke")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` (nested dicts merged, other values replaced)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The named preset, with ``overrides`` (nested ``{section: {field: value}}``) applied and validated.

    Raises ``ValueError`` naming the valid presets for an unknown name, and pydantic's ``ValidationError``
    (naming the field) for a bad override.
    """
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    merged = _merge(presets[name], overrides or {})
    merged["preset"] = name
    return RunConfig.model_validate(merged)


def resolve(
    preset: str,
    data: BaseModel | Mapping[str, Any] | None = None,
    model: BaseModel | Mapping[str, Any] | None = None,
    train: BaseModel | Mapping[str, Any] | None = None,
    sample: BaseModel | Mapping[str, Any] | None = None,
) -> RunConfig:
    """The preset with each given section's values (see ``section_values``) in place of its own, validated."""
    return preset_config(preset, overrides_dict(data, model, train, sample))


def section_values(section: BaseModel | Mapping[str, Any] | None) -> dict[str, Any]:
    """The values a section gives: a model's explicitly set fields, or a mapping's keys; None gives none.

    A section model built from ``{"epochs": 2}`` gives only ``epochs``: the fields it leaves out keep the
    preset's values. A complete section (every field set, as a form sends it) replaces the preset's whole.
    """
    if section is None:
        return {}
    if isinstance(section, BaseModel):
        return section.model_dump(include=set(section.model_fields_set))
    return dict(section)


def overrides_dict(
    data: BaseModel | Mapping[str, Any] | None = None,
    model: BaseModel | Mapping[str, Any] | None = None,
    train: BaseModel | Mapping[str, Any] | None = None,
    sample: BaseModel | Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The sections' given values (``section_values``) as ``{section: {field: value}}``, empty ones left out."""
    overrides: dict[str, dict[str, Any]] = {}
    for key, section in (("data", data), ("model", model), ("train", train), ("sample", sample)):
        values = section_values(section)
        if values:
            overrides[key] = values
    return overrides


def is_sha1(text: str) -> bool:
    """True for 40 hexadecimal digits."""
    return bool(_SHA1_RE.match(text))
