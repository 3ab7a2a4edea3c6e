"""deeprnn.model: same numbers as the book's ``RNNModel`` for the same weights; cells, embedding, dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeprnn.config import ModelConfig
from deeprnn.model import RNNLM, copy_state_, zero_state_

CPU = torch.device("cpu")


@pytest.mark.d2l
def test_lstm_matches_the_books_model(d2l) -> None:
    torch.manual_seed(0)
    book = d2l.RNNModel(nn.LSTM(28, 256, 2), 28)
    mine = RNNLM(28)
    assert set(mine.state_dict()) == set(book.state_dict())  # names match: the book's weights load as-is
    mine.load_state_dict(book.state_dict())

    x = torch.randint(0, 28, (32, 35), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 28, (32, 35), generator=torch.Generator().manual_seed(2))
    book_logits, (bh, bc) = book(x, book.begin_state(CPU, batch_size=32))
    logits, (h, c) = mine(x, mine.begin_state(32, CPU))
    assert logits.shape == (35 * 32, 28)
    torch.testing.assert_close(logits, book_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(h, bh, rtol=0, atol=1e-6)
    torch.testing.assert_close(c, bc, rtol=0, atol=1e-6)

    book_loss = nn.CrossEntropyLoss()(book_logits, y.T.reshape(-1).long()).mean()
    loss = F.cross_entropy(logits, y.T.reshape(-1))
    torch.testing.assert_close(loss, book_loss, rtol=0, atol=1e-6)

    # A carried, non-zero state gives the same next step too.
    logits2, _ = mine(x, (h, c))
    book_logits2, _ = book(x, (bh, bc))
    torch.testing.assert_close(logits2, book_logits2, rtol=0, atol=1e-6)


@pytest.mark.d2l
@pytest.mark.parametrize("cell, layer", [("gru", nn.GRU), ("rnn", nn.RNN)])
def test_gru_and_rnn_match_the_books_model(d2l, cell: str, layer: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    book = d2l.RNNModel(layer(10, 16, 2), 10)
    mine = RNNLM(10, cell=cell, num_hiddens=16, num_layers=2)
    mine.load_state_dict(book.state_dict())
    x = torch.randint(0, 10, (3, 7))
    state = mine.begin_state(3, CPU)
    assert isinstance(state, torch.Tensor) and state.shape == (2, 3, 16)
    logits, h = mine(x, state)
    book_logits, bh = book(x, book.begin_state(CPU, batch_size=3))
    torch.testing.assert_close(logits, book_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(h, bh, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cell, rnn_type", [("lstm", nn.LSTM), ("gru", nn.GRU), ("rnn", nn.RNN)])
def test_cells_shapes(cell: str, rnn_type: type[nn.RNNBase]) -> None:
    model = RNNLM(11, cell=cell, num_hiddens=8, num_layers=3)
    assert isinstance(model.rnn, rnn_type)
    state = model.begin_state(4, CPU)
    logits, new = model(torch.randint(0, 11, (4, 6)), state)
    assert logits.shape == (6 * 4, 11)
    if cell == "lstm":
        assert isinstance(new, tuple) and [s.shape for s in new] == [(3, 4, 8), (3, 4, 8)]
        assert all(torch.count_nonzero(s) == 0 for s in state)
    else:
        assert isinstance(new, torch.Tensor) and new.shape == (3, 4, 8)


def test_logits_are_time_major() -> None:
    torch.manual_seed(0)
    model = RNNLM(9, num_hiddens=8, num_layers=1)
    x = torch.randint(0, 9, (3, 5))
    logits, _ = model(x, model.begin_state(3, CPU))
    # Row t*B + b is step t of sequence b: sequence 1 alone gives rows 1, 4, 7, ...
    alone, _ = model(x[1:2], model.begin_state(1, CPU))
    torch.testing.assert_close(logits.reshape(5, 3, 9)[:, 1], alone, rtol=0, atol=1e-6)


def test_embedding_option() -> None:
    model = RNNLM(12, num_hiddens=8, num_layers=2, embedding_dim=5)
    assert isinstance(model.embedding, nn.Embedding) and model.embedding.weight.shape == (12, 5)
    assert model.rnn.input_size == 5
    logits, _ = model(torch.randint(0, 12, (2, 4)), model.begin_state(2, CPU))
    assert logits.shape == (8, 12)
    assert RNNLM(12, num_hiddens=8).embedding is None
    assert RNNLM(12, num_hiddens=8).rnn.input_size == 12  # one-hot, as in the book


def test_dropout_between_layers() -> None:
    model = RNNLM(10, num_hiddens=16, num_layers=2, dropout=0.5)
    assert model.rnn.dropout == 0.5
    assert model.drop.p == 0.5
    x = torch.randint(0, 10, (4, 6))
    torch.manual_seed(0)
    a, _ = model(x, model.begin_state(4, CPU))
    b, _ = model(x, model.begin_state(4, CPU))
    assert not torch.equal(a, b)  # training mode: dropout is active
    model.eval()
    c, _ = model(x, model.begin_state(4, CPU))
    d, _ = model(x, model.begin_state(4, CPU))
    assert torch.equal(c, d)
    # One layer: nothing between layers (and no PyTorch warning), output dropout still there.
    single = RNNLM(10, num_hiddens=16, num_layers=1, dropout=0.5)
    assert single.rnn.dropout == 0.0 and single.drop.p == 0.5


def test_from_config() -> None:
    cfg = ModelConfig(cell="gru", num_hiddens=12, num_layers=3, dropout=0.25, embedding_dim=7)
    model = RNNLM.from_config(20, cfg)
    assert isinstance(model.rnn, nn.GRU)
    assert (model.rnn.hidden_size, model.rnn.num_layers, model.rnn.dropout) == (12, 3, 0.25)
    assert model.embedding.weight.shape == (20, 7)
    assert model.linear.out_features == 20
    book = RNNLM.from_config(28, ModelConfig())
    assert isinstance(book.rnn, nn.LSTM) and (book.rnn.hidden_size, book.rnn.num_layers) == (256, 2)


def test_unknown_cell() -> None:
    with pytest.raises(ValueError, match="unknown cell 'transformer'"):
        RNNLM(5, cell="transformer")


def test_state_helpers() -> None:
    w = torch.ones(2, requires_grad=True)
    h, c = w * torch.tensor([1.0, 2.0]), w * torch.tensor([3.0, 4.0])  # a state still attached to a graph
    dst = (torch.zeros(2), torch.zeros(2))
    addresses = [s.data_ptr() for s in dst]
    copy_state_(dst, (h, c))
    assert [s.tolist() for s in dst] == [[1.0, 2.0], [3.0, 4.0]]
    assert [s.data_ptr() for s in dst] == addresses  # in place
    assert not any(s.requires_grad for s in dst)  # detached: the graph behind the carried state is cut
    zero_state_(dst)
    assert all(torch.count_nonzero(s) == 0 for s in dst)

    single = torch.zeros(3)
    copy_state_(single, torch.ones(3))
    assert single.tolist() == [1.0, 1.0, 1.0]
    zero_state_(single)
    assert single.tolist() == [0.0, 0.0, 0.0]
