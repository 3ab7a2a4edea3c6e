"""Stage 7: perplexity, token-weighted and safe against overflow, in pieces whose logits stay within
``LOGIT_FLOATS`` whatever the vocabulary, and (with a deadline) only as far as time allows."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from deeprnn.data.batching import eval_streams
from deeprnn.device import synchronize
from deeprnn.model import RNNLM, evaluating

_MAX_LOG = 709.0  # math.exp overflows a float above ~709.78
# Logits (rows x steps x vocabulary) of one piece of an evaluation at most: 64 MiB of floats. Only a large
# vocabulary makes the pieces shorter than ``chunk``.
LOGIT_FLOATS = 2**24


def perplexity_from_loss(mean_loss: float) -> float:
    """``exp(mean cross-entropy)``; ``inf`` instead of an OverflowError, ``nan`` stays ``nan``."""
    return math.inf if mean_loss >= _MAX_LOG else math.exp(mean_loss)  # nan compares false: exp(nan) is nan


@torch.no_grad()
def loss_sum(
    model: RNNLM, ids: torch.Tensor, rows: int = 32, chunk: int = 512, deadline: float | None = None
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over ``ids`` (on the model's device, not synced) and the number of targets.

    The text is laid out as ``rows`` streams read in ``chunk``-step pieces (shorter at a large vocabulary:
    at most ``LOGIT_FLOATS`` logits a piece) with the state carried across pieces, so every token after a
    stream's first is predicted from its full left context within the stream. ``ids`` may be of any integer
    dtype and on any device (a CPU tensor over a memory-mapped token cache, say): each piece is copied to the
    model's device as int64 on its own, never the whole split at once. With ``deadline`` (a
    ``time.perf_counter()`` value) no piece starts after it, though the first always runs: the sum and count
    then cover the pieces read.
    """
    device = next(model.parameters()).device
    x, y = eval_streams(ids, rows)  # (R, L), views of ids where it lives
    state = model.begin_state(x.shape[0], device)
    total = torch.zeros((), device=device, dtype=torch.float64)
    step = max(1, min(chunk, LOGIT_FLOATS // max(x.shape[0] * model.vocab_size, 1)))
    for start in range(0, x.shape[1], step):
        if deadline is not None and start:
            synchronize(device)  # a deadline means device time: the clock is read once queued work is done
            if time.perf_counter() >= deadline:
                return total, y[:, :start].numel()
        xs = x[:, start : start + step].to(device=device, dtype=torch.long)  # (R, t)
        ys = y[:, start : start + step].to(device=device, dtype=torch.long)
        logits, state = model(xs, state)  # (t*R, V)
        total += F.cross_entropy(logits, ys.T.reshape(-1), reduction="sum").to(torch.float64)
    return total, y.numel()


def perplexity(
    model: RNNLM, ids: torch.Tensor, rows: int = 32, chunk: int = 512, max_tokens: int | None = None
) -> float:
    """Perplexity of ``model`` on ``ids`` (any split), weighting every token equally.

    ``max_tokens`` reads only the first N tokens of ``ids`` (a cheaper estimate on a large split). The model
    is put in eval mode for the measurement and returned to the mode it was in.
    """
    return perplexity_until(model, ids, None, rows, chunk, max_tokens)[0]


def perplexity_until(
    model: RNNLM,
    ids: torch.Tensor,
    deadline: float | None,
    rows: int = 32,
    chunk: int = 512,
    max_tokens: int | None = None,
) -> tuple[float, int]:
    """``perplexity`` over the tokens read before ``deadline`` (``loss_sum``), and how many targets that was."""
    ids = ids[:max_tokens]  # None: all of them
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    with evaluating(model):
        total, count = loss_sum(model, ids, rows, chunk, deadline)
    return perplexity_from_loss(total.item() / count), count
