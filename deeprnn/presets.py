"""The named presets, as overrides of the book's defaults (``deeprnn.config``), kept as data so they read like a
parameter file. ``deeprnn.config.preset_config`` applies and validates them.

- ``d2l-9.3``: the book, D2L 9.3 (every default).
- ``full-book``: the whole book with settings that generalize.
- ``smoke``: seconds on a CPU, for tests and first contact.
- ``text``: your own text. Every character kept, the whole text, a validation split that picks the best
  weights, a time budget, early stopping, AdamW with warm-up and cosine decay over the planned steps, and a
  model sized to the text (``model.size = "auto"``, ``deeprnn.sizing``); samples continue the starts of lines
  drawn from the held-out text.
"""

from __future__ import annotations

from typing import Any

# Each preset as ``{section: {field: value}}`` overrides of the book's defaults.
PRESET_VALUES: dict[str, dict[str, Any]] = {
    "d2l-9.3": {},
    # Chosen with bench/tune_full_book.py among 12 candidates in two rounds of 6 (bench/results/
    # h200-full-book-candidates.json and -2.json; the chosen one alone: h200-full-book-chosen.json).
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
        "sample": {"num_tokens": 20},
    },
    # Your own text, chosen with bench/own_text.py on texts in five languages (bench/results/cpu-own-text.md).
    "text": {
        "data": {"normalize": "none", "max_tokens": None, "val_fraction": 0.05, "test_fraction": 0.1},
        "model": {"size": "auto", "num_layers": 2, "num_hiddens": 256, "embedding_dim": 128},
        "train": {
            "batch_size": 32,
            "num_steps": 64,
            "epochs": 1000,  # an upper bound: the time budget and early stopping end the run
            "time_budget": 300.0,
            # A CPU trains about as many tokens a second at 8 rows as at 32: a short budget learns more from
            # four times the steps (bench/results/cpu-own-text.md), while a GPU's budget plans far more anyway.
            "min_planned_steps": 4000,
            "optimizer": "adamw",
            "lr": 3e-3,
            "weight_decay": 0.01,
            "lr_schedule": "warmup-stable-decay",
            # No warm-up: AdamW at 3e-3 is stable from the first step here, and the first steps are the ones a
            # short budget needs to leave the plateau of single-character frequencies.
            "warmup_steps": 0,
            "evaluations": 12,
            "patience": 4,
            "eval_every": 1000,  # the evaluations above are spread over the planned steps instead
            "log_every": 1,
            # A periodic evaluation stays a small share of a short budget on a CPU.
            "eval_max_tokens": 40_000,
            "precision": "auto",
        },
        "sample": {"prefixes": [], "num_tokens": 200, "temperature": 0.8, "top_k": 20},
    },
}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` (nested dicts merged, other values replaced)."""
    out = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out
