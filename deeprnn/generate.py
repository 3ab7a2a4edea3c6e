"""Stage 8: continue a prefix, greedily as the book does, or by sampling with temperature and top-k."""

from __future__ import annotations

import logging
from typing import Literal

import torch

from deeprnn.model import RNNLM
from deeprnn.vocab import Vocab

log = logging.getLogger(__name__)


def split_prefix(prefix: str, token: Literal["char", "word"] = "char") -> list[str]:
    """The prefix as tokens of the vocabulary's kind."""
    return prefix.split() if token == "word" else list(prefix)


@torch.no_grad()
def generate(
    model: RNNLM,
    vocab: Vocab,
    prefix: str,
    num_tokens: int = 50,
    *,
    token: Literal["char", "word"] = "char",
    temperature: float | None = None,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """``prefix`` followed by ``num_tokens`` generated tokens.

    Greedy (``temperature=None``) reproduces the book's ``predict_ch8``: warm the state up on the prefix,
    then append the argmax. Otherwise sample from ``softmax(logits / temperature)``, restricted to the
    ``top_k`` likeliest tokens if given, with a generator seeded by ``seed``. Characters the vocabulary lacks
    are read as ``<unk>`` (with a warning) and printed back as they were typed.
    """
    tokens = split_prefix(prefix, token)
    if not tokens:
        raise ValueError("the prefix needs at least one token")
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    missing = vocab.unknown(tokens)
    if missing:
        log.warning("prefix tokens not in the vocabulary are read as <unk>: %s", missing)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([vocab.encode(tokens)], device=device)  # (1, P)
        state = model.begin_state(1, device)
        if ids.shape[1] > 1:
            _, state = model(ids[:, :-1], state)  # warm-up on all but the last prefix token
        current = ids[:, -1:]  # (1, 1)
        generator = None
        if temperature is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        out: list[torch.Tensor] = []
        # Tokens stay on the device: no host sync per generated token.
        for _ in range(num_tokens):
            logits, state = model(current, state)  # (1, V)
            if temperature is None:
                nxt = logits.argmax(dim=1)  # (1,)
            else:
                scaled = logits / temperature
                if top_k is not None and top_k < scaled.shape[1]:
                    kth = torch.topk(scaled, top_k, dim=1).values[:, -1:]  # (1, 1)
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(scaled, dim=1), 1, generator=generator).reshape(1)
            out.append(nxt)
            current = nxt.reshape(1, 1)
    finally:
        model.train(was_training)
    new = torch.cat(out).tolist() if out else []
    sep = " " if token == "word" else ""
    return prefix + (sep if token == "word" and new else "") + vocab.decode(new, sep)
