"""Stage 3: the vocabulary, token <-> index, in the book's order (D2L 8.2 ``Vocab``)."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

UNK = "<unk>"


class Vocab:
    """``<unk>`` at index 0, then reserved tokens, then tokens by descending frequency.

    Ties keep first-seen order, as the book's stable sort over a ``Counter`` does; tokens rarer than
    ``min_freq`` are left out and map to ``<unk>``.
    """

    def __init__(
        self, tokens: Iterable[str] | Mapping[str, int] = (), min_freq: int = 0, reserved_tokens: Sequence[str] = ()
    ) -> None:
        """The vocabulary of ``tokens``: a text's tokens, or their counts in first-seen order (a mapping, as
        ``Counter`` takes it: what a streamed count over a large corpus produces), index for index the same."""
        # sorted() is stable: equal counts keep first-seen order, as the book's sort over a Counter does.
        self.token_freqs: list[tuple[str, int]] = sorted(
            ((str(t), int(f)) for t, f in collections.Counter(tokens).items()), key=lambda kv: kv[1], reverse=True
        )
        self.idx_to_token: list[str] = [UNK, *reserved_tokens]
        self.token_to_idx: dict[str, int] = {tok: i for i, tok in enumerate(self.idx_to_token)}
        for tok, freq in self.token_freqs:
            if freq < min_freq:
                break
            if tok not in self.token_to_idx:
                self.token_to_idx[tok] = len(self.idx_to_token)
                self.idx_to_token.append(tok)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, token: str) -> int:
        return self.token_to_idx.get(token, self.unk)

    @property
    def unk(self) -> int:
        """Index of ``<unk>`` (always 0)."""
        return 0

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Indices of ``tokens``; unknown tokens become ``<unk>``."""
        return [self.token_to_idx.get(tok, 0) for tok in tokens]

    def decode(self, indices: Iterable[int], sep: str = "") -> str:
        """The tokens for ``indices`` joined by ``sep`` ('' for characters, ' ' for words)."""
        return sep.join(self.idx_to_token[i] for i in indices)

    def unknown(self, tokens: Iterable[str]) -> list[str]:
        """The distinct tokens of ``tokens`` that are not in the vocabulary, in first-seen order."""
        return list(dict.fromkeys(t for t in tokens if t not in self.token_to_idx))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (also what checkpoints store)."""
        return {"idx_to_token": list(self.idx_to_token), "token_freqs": [list(p) for p in self.token_freqs]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Vocab":
        """Rebuild a vocabulary saved by ``to_dict``, index for index."""
        vocab = cls()
        vocab.idx_to_token = list(data["idx_to_token"])
        if not vocab.idx_to_token or vocab.idx_to_token[0] != UNK:
            raise ValueError("not a deeprnn vocabulary: index 0 must be <unk>")
        vocab.token_to_idx = {tok: i for i, tok in enumerate(vocab.idx_to_token)}
        vocab.token_freqs = [(str(t), int(f)) for t, f in data.get("token_freqs", [])]
        return vocab

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        """Read a vocabulary written by ``save``."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
