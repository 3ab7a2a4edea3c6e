"""Human-readable outputs of a run: the perplexity curve and a samples text."""

from __future__ import annotations

from pathlib import Path

from deeprnn.training.progress import EpochStats


def plot_history(history: list[EpochStats], path: Path, title: str = "") -> Path:
    """Save training and held-out perplexity per epoch (log scale) as a PNG at ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global figure to close

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    ax.plot([h.epoch for h in history], [h.train_perplexity for h in history], label="train")
    held = [(h.epoch, h.heldout_perplexity) for h in history if h.heldout_perplexity is not None]
    if held:
        ax.plot(*zip(*held), marker="o", markersize=3, label="held-out")
    ax.set(yscale="log", xlabel="epoch", ylabel="perplexity", title=title or "perplexity per epoch")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def fmt(value: float | None) -> str:
    """A metric for a summary table: three decimals, or n/a when missing."""
    return "n/a" if value is None else f"{value:.3f}"


def samples_text(samples: dict[str, str]) -> str:
    """One continuation per line, in prefix order."""
    return "".join(f"{text}\n" for text in samples.values())


def samples_markdown(samples: dict[str, str]) -> list[str]:
    """The "Samples" section of a markdown summary: a heading and one code span per continuation."""
    return ["## Samples", "", *[f"- `{text}`" for text in samples.values()]]
