"""Stage 8: continue prefixes, greedily as the book does, or by sampling with temperature and top-k.

``generate_batch`` continues many prefixes at once: each prefix's state is warmed up on its own tokens
(prefixes of the same length together, in one call each), then every row advances together, one forward
step per generated token for the whole batch. ``generate`` is the one-prefix case of the same code, so the
book's greedy samples and a batch's rows are the same text.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from pydantic import ValidationError

from deeprnn.config import SampleConfig
from deeprnn.data.normalize import normalize_prefix
from deeprnn.data.vocab import Vocab
from deeprnn.device import synchronize
from deeprnn.model import RNNLM, State, evaluating, state_tensors

log = logging.getLogger(__name__)

Token = Literal["char", "word"]


def split_prefix(prefix: str, token: Token = "char") -> list[str]:
    """The prefix as tokens of the vocabulary's kind."""
    return prefix.split() if token == "word" else list(prefix)


_WARM_UP_POSITIONS = 65_536  # rows x positions per forward step of the warm-up: bounds its activations


class GenerationTimeoutError(TimeoutError):
    """Generation ran past its time limit and was stopped; nothing it made is kept."""


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise GenerationTimeoutError("generation ran past its time limit and was stopped")


def _warm_up(
    model: RNNLM, encoded: list[list[int]], device: torch.device, deadline: float | None = None
) -> tuple[State, torch.Tensor]:
    """The batch state after each row's prefix (all but its last token), and the last tokens (B, 1).

    Rows of one length run together through the recurrent layers: no padding, so each row's state is the
    one it would have alone. A large group runs in slices of positions, its state carried from one to the
    next, so that its activations stay within ``_WARM_UP_POSITIONS`` rows x positions.
    """
    state = model.begin_state(len(encoded), device)
    by_length: dict[int, list[int]] = defaultdict(list)
    for row, ids in enumerate(encoded):
        by_length[len(ids)].append(row)
    for length, rows in by_length.items():
        if length < 2:
            continue  # a one-token prefix starts from the zero state
        index = torch.tensor(rows, device=device)
        group = torch.tensor([encoded[r][:-1] for r in rows], device=device)  # (G, length-1)
        group_state = model.begin_state(len(rows), device)  # the batch state's rows are zeros too
        width = max(1, _WARM_UP_POSITIONS // len(rows))
        for start in range(0, length - 1, width):
            _check_deadline(deadline)
            _, group_state = model(group[:, start : start + width], group_state)
        for whole, part in zip(state_tensors(state), state_tensors(group_state)):
            whole[:, index] = part  # the group's rows of the batch state, in place
    last = torch.tensor([[row[-1]] for row in encoded], device=device)  # (B, 1)
    return state, last


def _next_tokens(
    logits: torch.Tensor, temperature: float | None, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row (B, 1): the argmax, or a sample from softmax(logits / temperature) within the top k."""
    if temperature is None:
        return logits.argmax(dim=1, keepdim=True)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[1]:
        kth = torch.topk(scaled, top_k, dim=1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, dim=1), 1, generator=generator)


@torch.no_grad()
def generate_ids(
    model: RNNLM,
    encoded: list[list[int]],
    num_tokens: int,
    *,
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    deadline: float | None = None,
) -> list[list[int]]:
    """The ``num_tokens`` token ids generated after each encoded prefix (each at least one id), on the
    model's device, in eval mode (the model's mode is restored afterwards). Past ``deadline`` (a
    ``time.monotonic()`` value) it stops, raising ``GenerationTimeoutError``."""
    SampleConfig(temperature=temperature, top_k=top_k)  # their bounds: a ValidationError is a ValueError
    if any(not ids for ids in encoded):
        raise ValueError("every prefix needs at least one token")
    if not encoded or num_tokens == 0:
        return [[] for _ in encoded]
    device = next(model.parameters()).device
    with evaluating(model):
        state, current = _warm_up(model, encoded, device, deadline)
        generator = torch.Generator(device=device).manual_seed(seed) if temperature is not None else None
        out: list[torch.Tensor] = []
        # Tokens stay on the device: no host sync per generated token.
        for _ in range(num_tokens):
            _check_deadline(deadline)
            logits, state = model(current, state)  # (B, V): one step for the whole batch
            current = _next_tokens(logits, temperature, top_k, generator)
            out.append(current)
    return torch.cat(out, dim=1).tolist()  # (B, num_tokens)


def generate_batch(
    model: RNNLM,
    vocab: Vocab,
    prefixes: Sequence[str],
    num_tokens: int = 50,
    *,
    token: Token = "char",
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
    normalize: str = "none",
    deadline: float | None = None,
) -> list[str]:
    """Each prefix followed by ``num_tokens`` generated tokens, all prefixes advancing together (stopped with
    ``GenerationTimeoutError`` past ``deadline``, a ``time.monotonic()`` value).

    Each prefix is first written as the corpus's rule ``normalize`` (``data.normalize``) wrote the training
    text, so a model of the book's rule reads ``The Time Traveller`` as ``the time traveller``; the texts
    returned start with the prefixes so normalized.

    Greedy (``temperature=None``) reproduces the book's ``predict_ch8`` for every row: warm the state up on
    the prefix, then append the argmax. Otherwise sample from ``softmax(logits / temperature)``, restricted
    to the ``top_k`` likeliest tokens if given, with one generator seeded by ``seed`` for the batch.
    Tokens the vocabulary lacks are read as ``<unk>`` (with a warning) and printed back as they were given.
    """
    prefixes = [normalize_prefix(p, normalize, token) for p in prefixes]
    split = [split_prefix(p, token) for p in prefixes]  # an empty one: generate_ids refuses it
    missing = vocab.unknown(t for tokens in split for t in tokens)
    if missing:
        log.warning("prefix tokens not in the vocabulary are read as <unk>: %s", missing)
    encoded = [vocab.encode(tokens) for tokens in split]
    new = generate_ids(model, encoded, num_tokens, temperature=temperature, top_k=top_k, seed=seed, deadline=deadline)
    sep = " " if token == "word" else ""
    return [p + (sep if new_ids else "") + vocab.decode(new_ids, sep) for p, new_ids in zip(prefixes, new)]


def generate(model: RNNLM, vocab: Vocab, prefix: str, num_tokens: int = 50, **options: Any) -> str:
    """``prefix`` followed by ``num_tokens`` generated tokens: ``generate_batch`` of one prefix, with its keyword
    ``options`` (``token``, ``temperature``, ``top_k``, ``seed``, ...)."""
    return generate_batch(model, vocab, [prefix], num_tokens, **options)[0]


# ----- requests from outside (the served model): checked against the configuration's bounds -------------

MAX_PREFIXES = 1024  # rows per request
# A request's work: over its prefixes, the tokens each is warmed up on plus the tokens generated after it.
# Every row of a request advances together, so this bounds both its time and its memory.
MAX_REQUEST_TOKENS = 1_000_000
_PARAM_FIELDS = ("num_tokens", "temperature", "top_k", "seed")
_OFF_AT_ZERO = {"temperature": " (or 0: greedy)", "top_k": " (or 0: no top-k filter)"}  # 0 in a request: None
# The former name of num_tokens, which models logged before the rename declare (and newer ones keep, 0: not given).
FORMER_NUM_TOKENS = "num_chars"


class GenerationRequestError(ValueError):
    """A request to generate that is refused before any work, with one line saying what to fix."""


def check_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The generation settings of a request (``num_tokens``, ``temperature``, ``top_k``, ``seed``), checked
    against the bounds of ``SampleConfig``; ``temperature`` 0 means greedy and ``top_k`` 0 means no filter,
    both returned as None; ``num_chars``, when not 0, stands for ``num_tokens`` (``FORMER_NUM_TOKENS``).
    ``GenerationRequestError`` naming the param and its bound otherwise."""
    params = dict(params or {})
    former = params.pop(FORMER_NUM_TOKENS, None)
    if former:  # None or 0: not given
        params["num_tokens"] = former
    unknown = sorted(set(params) - set(_PARAM_FIELDS))
    if unknown:
        raise GenerationRequestError(f"unknown param {unknown[0]!r}: use {', '.join(_PARAM_FIELDS)}")
    values: dict[str, Any] = {}  # what is not given: SampleConfig's default
    for name, value in params.items():
        value = value.item() if hasattr(value, "item") else value  # numpy scalars, as MLflow passes them
        if value is None or (name in _OFF_AT_ZERO and value == 0 and not isinstance(value, bool)):
            continue  # None: the default; 0: greedy / no top-k filter
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GenerationRequestError(f"param {name}={value!r}: must be a number")
        values[name] = value
    try:
        checked = SampleConfig(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0])
        shown = FORMER_NUM_TOKENS if name == "num_tokens" and former else name
        message = f"param {shown}={values[name]!r}: {first['msg'].lower()}{_OFF_AT_ZERO.get(name, '')}"
        raise GenerationRequestError(message) from None
    return checked.model_dump(include=set(_PARAM_FIELDS))


def check_prefixes(prefixes: Sequence[Any], vocab: Vocab, token: Token = "char", normalize: str = "none") -> list[str]:
    """The prefixes of a request, normalized by the corpus's rule ``normalize`` (``normalize_prefix``);
    refused (``GenerationRequestError``) when there are none or too many, or when one is not text, is empty,
    is longer than ``SampleConfig`` allows or has no token the model knows once normalized."""
    if not prefixes:
        raise GenerationRequestError("no prefix to continue: send at least one row with a non-empty 'prefix'")
    if len(prefixes) > MAX_PREFIXES:
        raise GenerationRequestError(f"{len(prefixes)} prefixes: at most {MAX_PREFIXES} per request")
    unit = "character" if token == "char" else "word"
    normalized = []
    for row, prefix in enumerate(prefixes):
        if not isinstance(prefix, str):
            raise GenerationRequestError(f"prefix {row}: must be text, got {type(prefix).__name__}")
        if not split_prefix(prefix, token):
            raise GenerationRequestError(f"prefix {row} is empty: give at least one {unit}")
        try:
            SampleConfig(prefixes=[prefix])  # the configuration's bound on a prefix's length
        except ValidationError as exc:
            raise GenerationRequestError(f"prefix {row}: {exc.errors()[0]['msg'].lower()}") from None
        normalized.append(normalize_prefix(prefix, normalize, token))
        tokens = split_prefix(normalized[-1], token)
        if len(vocab.unknown(tokens)) == len(set(tokens)):  # none at all once normalized, too
            raise GenerationRequestError(f"prefix {row} ({prefix[:40]!r}) has no {unit} the model knows")
    return normalized


def check_work(prefixes: Sequence[str], num_tokens: int, token: Token = "char") -> int:
    """The request's work (prefix tokens plus generated tokens, over all prefixes); ``GenerationRequestError``
    when it is above ``MAX_REQUEST_TOKENS``."""
    work = sum(len(split_prefix(p, token)) for p in prefixes) + len(prefixes) * num_tokens
    if work > MAX_REQUEST_TOKENS:
        raise GenerationRequestError(
            f"the request asks for {work:,} tokens of work ({len(prefixes):,} prefixes: their tokens plus "
            f"num_tokens={num_tokens:,} each); at most {MAX_REQUEST_TOKENS:,} per request: send fewer or "
            "shorter prefixes, or a smaller num_tokens"
        )
    return work


# ----- how long a request takes here: measured once when the model loads, then estimated per request -----


@dataclass(frozen=True)
class GenerationSpeed:
    """Seconds a model takes on one device, each measured at 1 row and at ``rows`` rows (in between and
    beyond: linear in the rows): ``warm`` per position of a prefix's warm-up, ``greedy`` and ``sampled`` per
    generated token (one forward step of the whole batch)."""

    rows: int
    warm: tuple[float, float]
    greedy: tuple[float, float]
    sampled: tuple[float, float]

    def at(self, pair: tuple[float, float], batch: int) -> float:
        """``pair``'s seconds at ``batch`` rows (never below its 1-row figure)."""
        one, many = pair
        return one + max(many - one, 0.0) * (batch - 1) / max(self.rows - 1, 1)

    def seconds(self, lengths: Sequence[int], num_tokens: int, sampled: bool = False) -> float:
        """The estimated seconds to continue prefixes of ``lengths`` tokens by ``num_tokens`` each, as one
        batch: each group of one length warmed up together (as ``_warm_up`` runs them), then every step."""
        warm = sum((n - 1) * self.at(self.warm, rows) for n, rows in Counter(lengths).items() if n > 1)
        return warm + num_tokens * self.at(self.sampled if sampled else self.greedy, len(lengths))

    def faster(self, other: GenerationSpeed) -> GenerationSpeed:
        """Each figure the smaller of this one's and ``other``'s (measured at the same ``rows``)."""
        pairs = zip((self.warm, self.greedy, self.sampled), (other.warm, other.greedy, other.sampled))
        return GenerationSpeed(self.rows, *((min(a[0], b[0]), min(a[1], b[1])) for a, b in pairs))

    def tokens_within(self, lengths: Sequence[int], seconds: float, sampled: bool = False) -> int:
        """The most tokens per prefix that ``seconds`` allow after the prefixes' warm-up (0: none)."""
        left = seconds - self.seconds(lengths, 0)
        return max(int(left / self.at(self.sampled if sampled else self.greedy, len(lengths))), 0)


def _fastest_seconds(work: Callable[[], object], repeats: int, device: torch.device, budget: float = 0.2) -> float:
    """The shortest time of ``work()`` on ``device`` (until the device is done with it) over ``repeats`` calls,
    or over two once they took ``budget`` seconds.

    The shortest, not a typical one: the figures hold for the server's whole life, and a moment of load
    while they are taken would otherwise refuse work for good; a request slowed down by load later is what
    the margin of its time limit is for.
    """
    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget):
        started = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


@torch.no_grad()
def measure_speed(model: RNNLM, rows: int = 1024, repeats: int = 3) -> GenerationSpeed:
    """Time ``model`` here, on its device: warm-up positions and generated tokens at 1 row and at ``rows``
    rows, each the fastest of up to ``repeats`` runs (fewer steps and positions a run at ``rows`` rows, which
    cost the most), after one short run of each kind that is not counted (lazy set-up on the device)."""
    device = next(model.parameters()).device

    def warm_up(batch: int, positions: int) -> float:
        run = partial(_warm_up, model, [[0] * (positions + 1)] * batch, device)
        return _fastest_seconds(run, repeats, device) / positions

    def steps(batch: int, count: int, temperature: float | None) -> float:
        top_k = 2 if temperature else None  # the top-k path: the costliest sampling
        run = partial(generate_ids, model, [[0]] * batch, count, temperature=temperature, top_k=top_k)
        return _fastest_seconds(run, repeats, device) / count

    with evaluating(model):
        generate_ids(model, [[0, 0]], 1)  # not counted: the first forward step sets things up
        generate_ids(model, [[0]], 1, temperature=1.0, top_k=2)
        greedy, sampled = [(steps(1, 16, temperature), steps(rows, 1, temperature)) for temperature in (None, 1.0)]
        return GenerationSpeed(rows, (warm_up(1, 32), warm_up(rows, 8)), greedy, sampled)
