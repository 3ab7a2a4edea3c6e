"""Stage 5: the recurrent language model (the book's ``RNNModel`` around ``nn.LSTM``/``GRU``/``RNN``)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn

from deeprnn.config import ModelConfig

# LSTM state is (h, c); GRU and RNN state is h alone. Each is (num_layers, B, H).
State = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

_CELLS: dict[str, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class RNNLM(nn.Module):
    """Token ids in, next-token logits out: one-hot (or embedding) -> stacked RNN -> linear.

    Parameter names (``rnn.*``, ``linear.*``) match the book's ``RNNModel``, so its weights load here as-is.
    Dropout (0 in the book) applies between recurrent layers and to the last layer's output.
    """

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        num_hiddens: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
        embedding_dim: int | None = None,
    ) -> None:
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"unknown cell {cell!r}; use one of {sorted(_CELLS)}")
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if embedding_dim else None
        input_size = embedding_dim or vocab_size
        self.rnn = _CELLS[cell](input_size, num_hiddens, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(num_hiddens, vocab_size)

    @classmethod
    def from_config(cls, vocab_size: int, cfg: ModelConfig) -> "RNNLM":
        """Build the model a ``ModelConfig`` describes."""
        return cls(vocab_size, cfg.cell, cfg.num_hiddens, cfg.num_layers, cfg.dropout, cfg.embedding_dim)

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``inputs`` (B, T) token ids -> logits (T*B, V), time-major as in the book, and the new state."""
        x = inputs.T  # (T, B)
        x = F.one_hot(x, self.vocab_size).float() if self.embedding is None else self.embedding(x)  # (T, B, V or E)
        y, state = self.rnn(x, state)  # (T, B, H)
        return self.linear(self.drop(y).reshape(-1, y.shape[-1])), state  # (T*B, V)

    def begin_state(self, batch_size: int, device: torch.device) -> State:
        """Zero state for ``batch_size`` sequences."""
        h = torch.zeros(self.rnn.num_layers, batch_size, self.rnn.hidden_size, device=device)
        if isinstance(self.rnn, nn.LSTM):
            return h, torch.zeros_like(h)
        return h


def state_tensors(state: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The tensors of a state: ``(h, c)`` for an LSTM, ``(h,)`` otherwise."""
    return state if isinstance(state, tuple) else (state,)


def copy_state_(dst: State, src: State | tuple[torch.Tensor, ...]) -> None:
    """Copy ``src`` (a state, or its ``state_tensors``) into the buffers of ``dst`` in place (keeps addresses
    stable for CUDA graphs), detached: the graph behind a carried state is cut (truncated back-propagation
    through time)."""
    for d, s in zip(state_tensors(dst), state_tensors(src)):
        d.copy_(s.detach())


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def zero_state_(state: State) -> None:
    """Reset a state to zeros in place."""
    for s in state_tensors(state):
        s.zero_()
