"""The CUDA fast path (whole step captured as a CUDA graph) against the plain eager loop. Needs a GPU."""

from __future__ import annotations

import pytest
import torch

from deeprnn.config import preset_config
from deeprnn.data.batching import split_corpus
from deeprnn.device import seed_everything
from deeprnn.model import RNNLM
from deeprnn.training.loop import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ids(n: int = 12000, vocab: int = 28) -> torch.Tensor:
    # Text with structure (a repeating phrase plus noise), so training really moves the weights.
    g = torch.Generator().manual_seed(1)
    phrase = torch.randint(1, vocab, (97,), generator=g)
    ids = phrase.repeat(n // 97 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.05
    ids[noise] = torch.randint(1, vocab, (int(noise.sum()),), generator=g)
    return ids


def _run(overrides: dict, fast: bool, epochs: int = 4) -> tuple[Trainer, list[float]]:
    train = {"epochs": epochs, "fast": fast, "eval_every": 2, "precision": "fp32", **overrides}
    cfg = preset_config("d2l-9.3", {"train": train})
    seed_everything(cfg.train.seed)
    model = RNNLM.from_config(28, cfg.model)
    splits = split_corpus(_ids(), 0.0, 0.1, cfg.data.max_tokens)
    trainer = Trainer(model, splits.train, cfg.train, torch.device("cuda"), heldout_ids=splits.test)
    result = trainer.fit()
    return trainer, [h.train_perplexity for h in result.history]


def _max_diff(a: Trainer, b: Trainer) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the book: SGD lr 2, clip 1, sequential
        {"optimizer": "adamw", "lr": 3e-3, "lr_schedule": "cosine", "weight_decay": 0.05},
        {"partition": "random"},
        {"clip_norm": None, "lr": 0.5},
    ],
    ids=["book-sgd", "adamw-cosine", "random-partition", "no-clip"],
)
def test_graph_step_matches_eager(overrides: dict) -> None:
    fast, fast_ppl = _run(overrides, fast=True)
    eager, eager_ppl = _run(overrides, fast=False)
    assert fast.step_mode == "cuda-graph"
    assert eager.step_mode == "eager"
    assert fast_ppl == pytest.approx(eager_ppl, rel=2e-3)
    assert _max_diff(fast, eager) < 5e-3
    assert fast_ppl[-1] < fast_ppl[0]  # it trained


def test_graph_resume_continues_like_one_run() -> None:
    straight, _ = _run({}, fast=True, epochs=4)
    cfg = preset_config("d2l-9.3", {"train": {"epochs": 2, "fast": True, "precision": "fp32"}})
    seed_everything(cfg.train.seed)
    model = RNNLM.from_config(28, cfg.model)
    splits = split_corpus(_ids(), 0.0, 0.1, cfg.data.max_tokens)
    first = Trainer(model, splits.train, cfg.train, torch.device("cuda"))
    first.fit()
    state, weights = first.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    cfg4 = preset_config("d2l-9.3", {"train": {"epochs": 4, "fast": True, "precision": "fp32"}})
    model2 = RNNLM.from_config(28, cfg4.model)
    model2.load_state_dict(weights)
    second = Trainer(model2, splits.train, cfg4.train, torch.device("cuda"))
    second.load_state_dict(state)
    second.fit()
    assert second.epoch == 4 and second.step_mode == "cuda-graph"
    assert _max_diff(straight, second) < 5e-3


def test_dropout_and_gru_capture() -> None:
    trainer, ppl = _run({}, fast=True, epochs=2)
    cfg = preset_config(
        "d2l-9.3",
        {"model": {"cell": "gru", "dropout": 0.3, "num_layers": 3}, "train": {"epochs": 2, "precision": "fp32"}},
    )
    seed_everything(0)
    model = RNNLM.from_config(28, cfg.model)
    t = Trainer(model, split_corpus(_ids(), 0.0, 0.1, None).train, cfg.train, torch.device("cuda"))
    result = t.fit()
    assert t.step_mode == "cuda-graph"
    assert all(torch.isfinite(torch.tensor(h.train_perplexity)) for h in result.history)
