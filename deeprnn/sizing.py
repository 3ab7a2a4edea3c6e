"""Sizing a configuration to the text it will train on, once the text is prepared: the model's size
(``model.size = "auto"``, the ``text`` preset), a batch shape that a short text can fill, and sample prefixes
drawn from the held-out text (``sample.prefixes`` empty).

The size rule, as char-rnn's and nanoGPT's guides size models to data:

* **data**: at most about as many weights as training tokens (char-rnn's advice: more weights than
  characters memorizes the text instead of learning it);
* **compute**: with a time budget, at least ``TOKENS_PER_WEIGHT`` training token per weight within the
  budget, at the throughput measured for that size on this device (a few timed steps each), so that the
  model the budget can afford is trained rather than barely started.

The largest of two stacked layers of ``WIDTHS`` hidden units that passes both is chosen (at least the
smallest); dropout 0.2 when the budget will pass over the text more than ``DROPOUT_EPOCHS`` times.

A large vocabulary: the output layer's logits (rows x steps x vocabulary floats, and their gradients) dominate
a step's time and memory, so the batch is made shorter until one step's logits fit ``LOGIT_FLOATS`` (rows
halved down to ``MIN_ROWS``, then steps down to 8): more, cheaper steps in the budget. There, with a time
budget, the held-out evaluations are capped too, to what the budget affords at the measured speed: one periodic
evaluation about ``EVAL_SHARE`` of it, the final one of each held-out split about ``FINAL_EVAL_SHARE / 2``, so
that a run reaches its samples in time. A vocabulary of up to 8,192 tokens keeps the preset's batch and
evaluations.

The batch: with a time budget and ``train.min_planned_steps``, the preset's rows are halved (down to
``MIN_ROWS``) until the budget plans that many steps at the measured throughput. A CPU trains about as many
tokens a second with fewer rows, so a short budget there gets more, smaller steps. A GPU's budget mostly plans
more steps than that at the full batch; where it does not, half the rows are measured too and kept only if
they keep most of the tokens a second.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from deeprnn.config import BOOK_PREFIXES, D2L_SHA1, D2L_URL, ModelConfig, RunConfig
from deeprnn.data.batching import min_tokens, split_corpus
from deeprnn.data.vocab import Vocab
from deeprnn.device import synchronize
from deeprnn.evaluate import LOGIT_FLOATS
from deeprnn.model import RNNLM
from deeprnn.presets import merge

WIDTHS = (128, 192, 256, 384, 512, 768, 1024)
TOKENS_PER_WEIGHT = 1.0
DROPOUT_EPOCHS = 8.0
MIN_ROWS = 8
HALF_ROWS_RATE = 0.6  # a CPU keeps nearly all its tokens a second at half the rows; a flat-step GPU keeps half
_PROBE_SECONDS = 0.6  # timed steps per candidate size, after one untimed step
EVAL_SHARE = 0.1  # one periodic held-out evaluation at most about this share of the time budget
FINAL_EVAL_SHARE = 0.1  # the final evaluation of the two held-out splits together at most about this share
MIN_EVAL_TOKENS = 1_000  # an evaluation reads at least this many tokens (or the whole split)
_EVAL_SPEEDUP = 2.0  # an evaluation (forward passes only) reads about twice the tokens a second of training


@dataclass(frozen=True)
class Sized:
    """A configuration sized to its text, and one line per decision saying what and why."""

    config: RunConfig
    notes: list[str]


def size_to_text(
    config: RunConfig, ids: torch.Tensor, vocab: Vocab, device: torch.device, corpus_sha1: str | None = None
) -> Sized:
    """``config`` with its auto-sized fields decided for the token ``ids`` (the whole prepared corpus) on
    ``device``, and with sample prefixes drawn from the held-out text where none are given (the book's own
    prefixes for the book, recognized by its URL or the SHA-1 of its bytes)."""
    data, notes = config.data, []
    splits = split_corpus(ids, data.val_fraction, data.test_fraction, data.max_tokens)
    update: dict[str, dict[str, object]] = {}
    if config.model.size == "auto" or _plans_batch(config):
        update["model"], update["train"], note = size_model(config, splits.train.numel(), len(vocab), device)
        notes.append(note)
    if not config.sample.prefixes:
        if data.url == D2L_URL or corpus_sha1 == D2L_SHA1:
            prefixes = list(BOOK_PREFIXES)
        else:
            heldout = splits.test if splits.test.numel() else splits.val
            prefixes = draw_prefixes(heldout, vocab, data.token, config.sample.seed)
            notes.append("sample prefixes drawn from the held-out text: " + ", ".join(repr(p) for p in prefixes))
        update["sample"] = {"prefixes": prefixes}
    return Sized(RunConfig.model_validate(merge(config.model_dump(), update)) if update else config, notes)


def decided_later(config: RunConfig) -> set[str]:
    """The ``section.field`` values ``size_to_text`` will decide (so they are logged once decided, not before)."""
    auto, plans = config.model.size == "auto", _plans_batch(config)
    decided = {  # the keys (space-separated), and whether they are decided
        "train.eval_max_tokens train.final_eval_max_tokens": config.train.time_budget is not None and (auto or plans),
        "model.size model.num_hiddens model.num_layers model.dropout train.batch_size train.num_steps": auto,
        "train.batch_size train.min_planned_steps": plans,
        "sample.prefixes": not config.sample.prefixes,
    }
    return {key for keys, due in decided.items() if due for key in keys.split()}


def _plans_batch(config: RunConfig) -> bool:
    return config.train.min_planned_steps > 0 and config.train.time_budget is not None


def within_logits(rows: int, num_steps: int, vocab_size: int) -> tuple[int, int]:
    """A batch shape whose logits (``rows`` x ``num_steps`` x ``vocab_size``) fit ``LOGIT_FLOATS``: rows
    halved down to ``MIN_ROWS``, then steps down to 8; a small vocabulary keeps the shape it has."""
    while rows * num_steps * vocab_size > LOGIT_FLOATS and rows // 2 >= MIN_ROWS:
        rows //= 2
    while rows * num_steps * vocab_size > LOGIT_FLOATS and num_steps // 2 >= 8:
        num_steps //= 2
    return rows, num_steps


def eval_caps(config: RunConfig, rate: float, train_tokens: int) -> tuple[dict[str, object], str]:
    """The held-out tokens the time budget affords at ``rate`` training tokens a second: ``eval_max_tokens``
    for one periodic evaluation, ``final_eval_max_tokens`` for each held-out split of the final one; each only
    where it reads less than the configuration would (and the split is longer), with a note saying so."""
    train, data = config.train, config.data
    eval_rate = _EVAL_SPEEDUP * rate * (train.time_budget or 0.0)  # tokens an evaluation reads in the budget
    kept = max(1.0 - data.val_fraction - data.test_fraction, 0.01)
    heldout = train_tokens * max(data.val_fraction, data.test_fraction) / kept
    fields: dict[str, object] = {}
    for key, share in (("eval_max_tokens", EVAL_SHARE), ("final_eval_max_tokens", FINAL_EVAL_SHARE / 2)):
        cap = max(int(share * eval_rate), MIN_EVAL_TOKENS)
        if cap < min(getattr(train, key) or heldout, heldout):
            fields[key] = cap
    shown = ", ".join(f"{k} {v:,}" for k, v in fields.items())
    return fields, f"; held-out evaluations capped to what the budget affords: {shown}" if fields else ""


def weights(vocab_size: int, model: ModelConfig) -> int:
    """The number of trained weights of ``model`` over ``vocab_size`` tokens (embedding, layers, output)."""
    gates, h = {"lstm": 4, "gru": 3, "rnn": 1}[model.cell], model.num_hiddens
    inputs = [model.embedding_dim or vocab_size] + [h] * (model.num_layers - 1)  # each layer's input width
    layers = sum(gates * h * (width + h + 2) for width in inputs)  # input and hidden weights, two biases
    return vocab_size * (model.embedding_dim or 0) + layers + (h + 1) * vocab_size


def size_model(
    config: RunConfig, train_tokens: int, vocab_size: int, device: torch.device
) -> tuple[dict[str, object], dict[str, object], str]:
    """The model fields (layers, width, dropout; none for a model of a fixed size) and the batch fields for
    ``train_tokens`` and the time budget, and a note saying what was decided and why.

    The batch is the shape ``batch_shape`` and ``within_logits`` give; with a batch planned for the time
    budget, its rows from ``rows_for_steps`` at the throughput measured here; where the logits shortened the
    batch, the held-out evaluations capped by ``eval_caps``.
    """
    train, budget = config.train, config.train.time_budget
    shape = batch_shape(train_tokens, train.batch_size, train.num_steps)
    batch_size, num_steps = within_logits(*shape, vocab_size)

    def measure(model: ModelConfig, rows: int = batch_size) -> float:
        return measure_throughput(model, vocab_size, rows, num_steps, device, train.lr)

    if config.model.size == "auto":
        chosen, rate = _widest(config, train_tokens, vocab_size, measure)
        seen = rate * budget if rate is not None and budget is not None else float(train.epochs * train_tokens)
        passes = seen / max(train_tokens, 1)
        dropout = 0.2 if passes > DROPOUT_EPOCHS else 0.0
        speed = f", {rate:,.0f} tokens/s measured here" if rate is not None else ""
        note = (
            f"model sized to the text: {chosen.num_layers} x {chosen.num_hiddens} {chosen.cell}, "
            f"{weights(vocab_size, chosen):,} weights for {train_tokens:,} training tokens{speed}, about "
            f"{passes:.1f} passes over the text, dropout {dropout}"
        )
        model = chosen.model_dump(include={"num_hiddens", "num_layers"}) | {"dropout": dropout, "size": "fixed"}
    else:
        chosen, rate, model, note = config.model, measure(config.model), {}, "batch sized to the budget"
    fields: dict[str, object] = {"batch_size": batch_size, "num_steps": num_steps}
    if _plans_batch(config):
        fields["min_planned_steps"] = 0  # decided once: a resumed run keeps this batch
        if rate is not None:
            rows, rate = rows_for_steps(rate, config, batch_size, num_steps, partial(measure, chosen))
            planned = rate * (budget or 0.0) / (rows * num_steps)
            fields["batch_size"] = rows
            if not model:  # a model of a fixed size: its throughput at the rows chosen
                note += f": {rate:,.0f} tokens/s measured here"
            note += f", batch {rows} x {num_steps}: about {planned:,.0f} steps in the budget"
    if (batch_size, num_steps) != shape and rate is not None and budget is not None:
        caps, caps_note = eval_caps(config, rate, train_tokens)  # a vocabulary whose logits shortened the batch
        fields.update(caps)
        note += caps_note
    return model, fields, note


def _widest(
    config: RunConfig, train_tokens: int, vocab_size: int, measure: Callable[[ModelConfig], float]
) -> tuple[ModelConfig, float | None]:
    """The widest model of two stacked layers of ``WIDTHS`` units (at least the narrowest) that the data rule
    allows, and with a time budget the compute rule at the throughput ``measure`` gives (also returned)."""
    budget, chosen, rate = config.train.time_budget, None, None
    for width in WIDTHS:
        candidate = config.model.model_copy(update={"num_hiddens": width, "dropout": 0.0})
        n = weights(vocab_size, candidate)
        if chosen is not None and n > train_tokens:
            break  # the data rule: no more weights than training tokens
        if budget is not None:
            measured = measure(candidate)
            if chosen is not None and measured * budget < TOKENS_PER_WEIGHT * n:
                break  # the compute rule: the budget could not train it
            rate = measured
        chosen = candidate
    assert chosen is not None
    return chosen, rate


def rows_for_steps(
    rate: float, config: RunConfig, batch_size: int, num_steps: int, measure: Callable[[int], float]
) -> tuple[int, float]:
    """The rows of a batch for the time budget, and their throughput: ``batch_size`` (at ``rate`` tokens/s)
    halved, not below ``MIN_ROWS``, while the budget plans fewer than ``train.min_planned_steps`` steps of
    ``rows x num_steps`` tokens and half the rows keep ``HALF_ROWS_RATE`` of the tokens a second
    (``measure(rows)``; a half that looks slow is measured again beside the whole). On a CPU they keep nearly
    all, so the budget makes more steps; on a GPU whose step time hardly depends on the rows, fewer rows would
    only mean fewer tokens."""
    budget = config.train.time_budget or 0.0
    rows = batch_size
    while rows // 2 >= MIN_ROWS and rate * budget / (rows * num_steps) < config.train.min_planned_steps:
        half = measure(rows // 2)
        if half < HALF_ROWS_RATE * rate:
            # A busy machine slows some probes and not others: before keeping the rows, measure both sizes
            # once more, back to back, and compare each one's best (a probe is only ever slowed down).
            rate, half = max(rate, measure(rows)), max(half, measure(rows // 2))
            if half < HALF_ROWS_RATE * rate:
                break
        rows, rate = rows // 2, half
    return rows, rate


def batch_shape(train_tokens: int, batch_size: int, num_steps: int) -> tuple[int, int]:
    """The preset's batch shape, made smaller for a text too short to fill it at least 16 times."""
    while num_steps > 8 and train_tokens < 16 * min_tokens(1, num_steps):
        num_steps //= 2
    rows = max(1, min(batch_size, (train_tokens - num_steps - 1) // (16 * num_steps)))
    return rows, num_steps


def measure_throughput(
    model_cfg: ModelConfig, vocab_size: int, batch_size: int, num_steps: int, device: torch.device, lr: float
) -> float:
    """Training tokens per second of a fresh model of this shape on ``device`` (a few timed steps)."""
    model = RNNLM.from_config(vocab_size, model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    x = torch.randint(0, vocab_size, (batch_size, num_steps), generator=torch.Generator().manual_seed(0)).to(device)
    state = model.begin_state(batch_size, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits, _ = model(x, state)  # (T*B, V)
        F.cross_entropy(logits, x.T.reshape(-1)).backward()
        optimizer.step()
        synchronize(device)

    step()  # allocations and kernel choice stay out of the timing
    steps, started = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - started < _PROBE_SECONDS:
        step()
        steps += 1
    return steps * batch_size * num_steps / (time.perf_counter() - started)


def draw_prefixes(heldout: torch.Tensor, vocab: Vocab, token: str, seed: int, count: int = 3) -> list[str]:
    """``count`` prefixes from the held-out ids: the starts of lines (the first two words, or the first eight
    characters of a text without spaces), drawn deterministically for ``seed``.

    Lines are taken from the held-out text's first 200,000 tokens; a text without line breaks (e.g. the book's
    rule joins them) gives starts of words instead. Lines holding ``<unk>`` are skipped.
    """
    sep = " " if token == "word" else ""
    tokens = [vocab.idx_to_token[i] for i in heldout[:200_000].tolist()]
    starts = [i + 1 for i, t in enumerate(tokens[:-1]) if t == "\n" and not tokens[i + 1].isspace()]
    if len(starts) < count:
        starts = [i + 1 for i, t in enumerate(tokens[:-1]) if t == " " and not tokens[i + 1].isspace()]
    lines = (tokens[start : start + 200] for start in starts)
    texts = (sep.join(line[: line.index("\n")] if "\n" in line else line) for line in lines)
    candidates = [_line_start(text, token) for text in texts if text.strip() and "<unk>" not in text]
    if not candidates:
        return [sep.join(tokens[:8]) or vocab.idx_to_token[-1]]
    picked = sorted(random.Random(seed).sample(range(len(candidates)), min(count, len(candidates))))
    return list(dict.fromkeys(candidates[i] for i in picked))


def _line_start(line: str, token: str) -> str:
    """The first two words of ``line`` (three word tokens), or its first eight characters without spaces."""
    words = line.split()
    if token == "word":
        return " ".join(words[:3])
    two = " ".join(words[:2])
    return two if len(words) > 1 and len(two) <= 24 else line.strip()[:8]
