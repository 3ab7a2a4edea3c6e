"""Training against held-out evaluation time on a large corpus, with and without ``--eval-max-tokens``.

Builds a corpus of about ``--mb`` MB by repeating the book in a temporary folder (deleted afterwards),
tokenizes it with the library's own functions, splits it as the preset does, and trains the preset once per
cap in ``--caps``, side by side in this one process. Evaluation time is the time spent in the periodic
held-out evaluations; training time is the device time of the epochs. The last column is the final test
perplexity over the whole test split (what the ``evaluate-model`` task measures), timed once.

    python bench/eval_budget.py --mb 40 --caps none,1000000,10000
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
BOOK = REPO.parent / "shared" / "data" / "timemachine.txt"


def _caps(text: str) -> list[int | None]:
    return [None if c.strip().lower() == "none" else int(c) for c in text.split(",") if c.strip()]


def build_ids(book: Path, megabytes: float):  # -> (torch.Tensor, int, float)
    """Token ids of the book repeated to ``megabytes`` MB (uint8), its vocabulary size and the seconds it took."""
    import torch

    from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize
    from deeprnn.data.vocab import Vocab

    started = time.perf_counter()
    text = book.read_text(encoding="utf-8")
    repeats = max(1, round(megabytes * 1e6 / len(text.encode("utf-8"))))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.txt"
        path.write_text(text * repeats, encoding="utf-8")
        print(f"corpus: {path.stat().st_size / 1e6:.1f} MB ({repeats} copies of the book)", flush=True)
        tokens = flatten(tokenize(preprocess_lines(path.read_text(encoding="utf-8")), "char"))
    vocab = Vocab(tokens)
    ids = torch.tensor(vocab.encode(tokens), dtype=torch.uint8 if len(vocab) <= 256 else torch.int32)
    return ids, len(vocab), time.perf_counter() - started


def run(ids, vocab_size: int, preset: str, cap: int | None, device: str) -> dict[str, float | int | None]:
    """Train ``preset`` with ``eval_max_tokens=cap``; returns its times and perplexities."""
    from deeprnn.config import preset_config
    from deeprnn.data.batching import split_corpus
    from deeprnn.device import resolve_device, seed_everything
    from deeprnn.evaluate import perplexity
    from deeprnn.model import RNNLM
    from deeprnn.training.loop import Trainer

    config = preset_config(preset, {"train": {"device": device, "eval_max_tokens": cap}})
    dev = resolve_device(device)
    splits = split_corpus(ids, config.data.val_fraction, config.data.test_fraction, config.data.max_tokens)
    heldout = splits.val if splits.val.numel() > 0 else splits.test
    seed_everything(config.train.seed)
    model = RNNLM.from_config(vocab_size, config.model)
    trainer = Trainer(model, splits.train, config.train, dev, heldout_ids=heldout, select_best=splits.val.numel() > 0)
    timed = {"seconds": 0.0, "count": 0}
    measure = trainer._heldout_perplexity

    def timed_evaluation() -> float:
        started = time.perf_counter()
        try:
            return measure()
        finally:
            timed["seconds"] += time.perf_counter() - started
            timed["count"] += 1

    trainer._heldout_perplexity = timed_evaluation  # type: ignore[method-assign]
    result = trainer.fit()
    started = time.perf_counter()
    test = perplexity(model, splits.test, rows=config.train.batch_size)
    return {
        "cap": cap,
        "heldout_tokens": heldout.numel(),
        "train_tokens": splits.train.numel(),
        "evaluations": timed["count"],
        "eval_tokens": result.eval_tokens,
        "train_s": sum(h.seconds for h in result.history),
        "eval_s": timed["seconds"],
        "fit_s": result.train_seconds,
        "last_heldout_ppl": result.history[-1].heldout_perplexity,
        "final_test_s": time.perf_counter() - started,
        "test_ppl": test,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size in MB (default 40)")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument(
        "--caps", type=_caps, default=_caps("none,1000000,10000"), help="eval_max_tokens values; none = no cap"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--book", type=Path, default=BOOK)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on 1)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    ids, vocab_size, prep_s = build_ids(args.book, args.mb)
    print(
        f"{ids.numel():,} tokens, vocabulary {vocab_size}, prepared in {prep_s:.1f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    run(ids[:200_000], vocab_size, args.preset, args.caps[0], args.device)  # warm-up: first-call costs out of the table
    rows = [run(ids, vocab_size, args.preset, cap, args.device) for cap in args.caps]
    print(
        f"\n{args.preset} preset, {args.mb:g} MB corpus, device {args.device}: `{shlex.join(['python', *sys.argv])}`\n"
    )
    print(
        "| eval_max_tokens | held-out tokens | tokens per evaluation | evaluations | training s | evaluating s "
        "| eval / train | last held-out ppl | final test (whole split) s | test ppl |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ratio = r["eval_s"] / r["train_s"] if r["train_s"] else float("nan")
        print(
            f"| {r['cap'] if r['cap'] is not None else 'none'} | {r['heldout_tokens']:,} | {r['eval_tokens']:,} "
            f"| {r['evaluations']} | "
            f"{r['train_s']:.2f} | {r['eval_s']:.2f} | {ratio:.2f} | {r['last_heldout_ppl']:.3f} | "
            f"{r['final_test_s']:.2f} | {r['test_ppl']:.3f} |"
        )


if __name__ == "__main__":
    main()
