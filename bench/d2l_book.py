"""The book's own program (d2l 0.17.6, section 9.3), instrumented per epoch, as the benchmark's baseline.

Same model, data pipeline, optimizer and training step as ``../shared/bench/d2l_reference.py`` (which runs
``d2l.train_ch8`` and only reports its last line): this file runs the body of ``train_ch8`` itself, calling
d2l's ``train_epoch_ch8`` once per epoch, so it can record each epoch's training perplexity and duration.
Everything that is timed is d2l's code; the loop around it adds one ``perf_counter`` (and, on CUDA, one
synchronize, which costs nothing because d2l's step already syncs with the host every minibatch).

Differences from ``d2l_reference.py``, none of which changes the training:

* the corpus is read in place from DATA_DIR (after d2l's own SHA-1 check) instead of being copied;
* Python's ``random`` (minibatch offsets) is seeded as well as torch, so runs are repeatable, and the offsets
  are the ones ``deeprnn``'s trainer draws for the same seed;
* tokens are counted exactly, per epoch;
* after training (untimed): held-out perplexity on the last ``--heldout-fraction`` of the corpus, measured
  with ``deeprnn.evaluate.perplexity`` exactly as ``deeprnn`` measures it, and peak memory.

Usage: python bench/d2l_book.py DATA_DIR [--epochs N] [--device cpu|cuda] [--max-tokens N] [--batch-size B]
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import math
import random
import resource
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# d2l 0.17.6 imports plotting and vision packages at import time; the benchmark needs none of them.
# (The same stubbing as ../shared/bench/d2l_reference.py.)
for _name in [
    "torchvision",
    "torchvision.transforms",
    "PIL",
    "PIL.Image",
    "IPython",
    "IPython.display",
    "matplotlib",
    "matplotlib.pyplot",
    "matplotlib_inline",
    "matplotlib_inline.backend_inline",
    "pandas",
]:
    if _name not in sys.modules:
        try:
            __import__(_name)
        except Exception:
            _stub = types.ModuleType(_name)
            _stub.__spec__ = importlib.machinery.ModuleSpec(_name, None)
            sys.modules[_name] = _stub
for _parent, _child in [
    ("torchvision", "transforms"),
    ("PIL", "Image"),
    ("IPython", "display"),
    ("matplotlib", "pyplot"),
    ("matplotlib_inline", "backend_inline"),
]:
    if not hasattr(sys.modules[_parent], _child):
        setattr(sys.modules[_parent], _child, sys.modules[f"{_parent}.{_child}"])


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", help="folder holding timemachine.txt")
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-tokens", type=int, default=10000, help="the book's 10000; -1: the whole corpus")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-steps", type=int, default=35)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="0: skip the held-out perplexity")
    p.add_argument("--target-ppl", type=float, default=1.05)
    p.add_argument("--num-preds", type=int, default=50)
    return p.parse_args()


def _peak_memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_mem_kind": "cuda_max_allocated"}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "peak_mem_kind": "rss"}


def main() -> None:
    a = _parse()
    import torch
    from d2l import torch as d2l
    from torch import nn

    if a.threads:
        torch.set_num_threads(a.threads)

    corpus_path = Path(a.data_dir).resolve() / "timemachine.txt"
    url, sha1 = d2l.DATA_HUB["time_machine"]

    def _local_download(name: str, cache_dir: str = "") -> str:
        # d2l.download, minus the network: the same SHA-1 check, on the file where it already lies.
        if name != "time_machine":
            raise RuntimeError(f"the benchmark serves only time_machine, not {name!r}")
        if hashlib.sha1(corpus_path.read_bytes()).hexdigest() != sha1:
            raise RuntimeError(f"{corpus_path} is not the book's timemachine.txt (sha1 {sha1})")
        return str(corpus_path)

    d2l.download = _local_download

    class _NoAnimator:  # the book plots every 10 epochs; a benchmark does not
        def __init__(self, *args, **kw):
            pass

        def add(self, *args, **kw):
            pass

    d2l.Animator = _NoAnimator

    random.seed(a.seed)  # d2l draws minibatch offsets from Python's global generator
    torch.manual_seed(a.seed)
    train_iter, vocab = d2l.load_data_time_machine(a.batch_size, a.num_steps, max_tokens=a.max_tokens)
    device = torch.device(a.device)
    net = d2l.RNNModel(nn.LSTM(len(vocab), a.hidden, a.layers), len(vocab)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    class _Counting:
        """train_iter, counting the target tokens each epoch actually yields (random offset per epoch)."""

        def __init__(self, inner) -> None:
            self.inner, self.tokens = inner, 0

        def __iter__(self):
            for X, Y in self.inner:
                self.tokens += Y.numel()
                yield X, Y

    counted = _Counting(train_iter)

    # The body of d2l.train_ch8 (nn.Module branch), with a clock around each train_epoch_ch8.
    loss = nn.CrossEntropyLoss()
    updater = torch.optim.SGD(net.parameters(), a.lr)
    predict = lambda prefix: d2l.predict_ch8(prefix, a.num_preds, net, vocab, device)  # noqa: E731
    history = []
    elapsed = 0.0  # sum of epoch times
    target_epoch = target_seconds = None
    cpu_start, t_start = time.process_time(), time.perf_counter()
    for epoch in range(a.epochs):
        before = counted.tokens
        t0 = time.perf_counter()
        ppl, speed = d2l.train_epoch_ch8(net, counted, loss, updater, device, False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        elapsed += seconds
        tokens = counted.tokens - before
        history.append(
            {
                "epoch": epoch + 1,
                "train_perplexity": ppl,
                "seconds": seconds,
                "tokens": tokens,
                "tokens_per_sec": tokens / seconds,
                "d2l_tokens_per_sec": speed,
            }
        )
        if target_epoch is None and ppl <= a.target_ppl:
            target_epoch, target_seconds = epoch + 1, elapsed
        if (epoch + 1) % 10 == 0:
            predict("time traveller")  # the book prints a sample every 10 epochs; kept, it is part of its loop
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t_start
    train_cpu_s = time.process_time() - cpu_start
    samples = {p: predict(p) for p in ("time traveller", "traveller")}  # untimed, as deeprnn's
    peak = _peak_memory(device)

    heldout = None
    if a.heldout_fraction > 0:
        heldout = _heldout_perplexity(d2l, net, vocab, a.heldout_fraction, a.batch_size, device)

    tokens_total = counted.tokens
    print(
        json.dumps(
            {
                "impl": "d2l-0.17.6 (bench/d2l_book.py)",
                "device": str(device),
                "epochs": a.epochs,
                "batch_size": a.batch_size,
                "num_steps": a.num_steps,
                "max_tokens": a.max_tokens,
                "vocab_size": len(vocab),
                "vocab_sha1": hashlib.sha1("\n".join(vocab.idx_to_token).encode()).hexdigest(),
                "torch_threads": torch.get_num_threads(),
                "tokens_total": tokens_total,
                "tokens_per_epoch": tokens_total / max(1, a.epochs),
                "train_wall_s": wall,
                "train_cpu_s": train_cpu_s,
                "epoch_seconds_total": elapsed,
                "tokens_per_s": tokens_total / elapsed if elapsed > 0 else 0.0,
                "overall_tokens_per_s": tokens_total / wall if wall > 0 else 0.0,
                "d2l_tokens_per_s": history[-1]["d2l_tokens_per_sec"] if history else None,
                "final_train_perplexity": history[-1]["train_perplexity"] if history else math.nan,
                "heldout_perplexity": heldout,
                "target_ppl": a.target_ppl,
                "target_epoch": target_epoch,
                "time_to_target_s": target_seconds,
                "samples": samples,
                "history": history,
                **peak,
            }
        )
    )


def _heldout_perplexity(d2l, net, vocab, fraction: float, rows: int, device) -> float:
    """Perplexity of the book's model on the last ``fraction`` of the corpus, measured as deeprnn measures it."""
    import torch
    from torch import nn

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from deeprnn.evaluate import perplexity

    tokens = [t for line in d2l.tokenize(d2l.read_time_machine(), "char") for t in line]
    ids = torch.tensor([vocab[t] for t in tokens])
    test = ids[len(ids) - int(round(len(ids) * fraction)) :]

    class _Adapter(nn.Module):  # deeprnn's begin_state(batch_size, device) over d2l's begin_state(device, batch_size)
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x, state):
            return self.inner(x, state)

        def begin_state(self, batch_size, dev):
            return self.inner.begin_state(dev, batch_size)

    return perplexity(_Adapter(net), test.to(device), rows=rows)


if __name__ == "__main__":
    main()
