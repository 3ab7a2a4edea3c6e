"""``--mode kernels``: the CPU kernels behind the fast path (LSTM forward+backward, the whole step, the forward
alone) with oneDNN on and off, per thread count: the worker, the mode and its table."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Any, Callable, Iterator

from speed.format import _pct, _table
from speed.runner import Runner, _cpu_name, _import_repo, _log


@contextlib.contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    """oneDNN on or off for the block; only that flag (``mkldnn.flags`` also resets tf32/deterministic)."""
    import torch

    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def worker_kernels(a: argparse.Namespace) -> dict[str, Any]:
    """ms per call of the LSTM fwd+bwd, the full training step and the forward, oneDNN on vs off."""
    _import_repo()
    import torch
    import torch.nn.functional as F

    from deeprnn.config import preset_config
    from deeprnn.model import RNNLM
    from deeprnn.training.step import clip_grad_norm_

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = preset_config("d2l-9.3")
    vocab_size, hidden, layers = 28, cfg.model.num_hiddens, cfg.model.num_layers  # the book's char vocabulary
    steps = cfg.train.num_steps
    results = []
    for batch in a.batch_sizes or [cfg.train.batch_size]:
        torch.manual_seed(0)
        model = RNNLM(vocab_size, "lstm", hidden, layers)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=cfg.train.lr)
        x = torch.randint(0, vocab_size, (batch, steps))  # (B, T)
        y = torch.randint(0, vocab_size, (batch, steps))
        state = model.begin_state(batch, torch.device("cpu"))

        def lstm_fwd_bwd() -> None:
            onehot = F.one_hot(x.T, vocab_size).to(torch.float32)  # (T, B, V)
            out, _ = model.rnn(onehot, state)  # (T, B, H)
            for p_ in params:
                p_.grad = None
            out.sum().backward()

        def train_step() -> None:  # what Trainer._step does on the CPU
            opt.zero_grad(set_to_none=True)
            logits, new_state = model(x, state)  # (T*B, V)
            loss = F.cross_entropy(logits, y.T.reshape(-1))
            loss.backward()
            clip_grad_norm_([p_.grad for p_ in params], cfg.train.clip_norm)
            opt.step()

        @torch.no_grad()
        def forward() -> None:
            model(x, state)

        for what, fn in (("lstm fwd+bwd", lstm_fwd_bwd), ("train step", train_step), ("forward (no grad)", forward)):
            results.append({"batch_size": batch, "what": what, **_time_onednn(fn)})
    return {
        "impl": "kernels",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device_name": _cpu_name(),
        "num_steps": steps,
        "hidden": hidden,
        "layers": layers,
        "vocab_size": vocab_size,
        "results": results,
    }


def _time_onednn(fn: Callable[[], None], rounds: int = 7, budget_s: float = 0.4) -> dict[str, Any]:
    """Median ms per call with oneDNN on and off, alternating which goes first each round."""
    first: dict[bool, float] = {}
    for flag in (True, False):  # first call per setting: primitive creation, allocator warm-up
        with _onednn(flag):
            t0 = time.perf_counter()
            fn()
            first[flag] = (time.perf_counter() - t0) * 1e3
            fn()
    with _onednn(True):
        t0 = time.perf_counter()
        fn()
        n = max(3, int(budget_s / max(time.perf_counter() - t0, 1e-6)))
    per: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for flag in (True, False) if r % 2 == 0 else (False, True):
            with _onednn(flag):
                fn()  # one untimed call after switching
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                per[flag].append((time.perf_counter() - t0) * 1e3 / n)
    on, off = statistics.median(per[True]), statistics.median(per[False])
    return {
        "onednn_on_ms": on,
        "onednn_off_ms": off,
        "off_over_on": off / on,
        "onednn_on_min_ms": min(per[True]),
        "onednn_off_min_ms": min(per[False]),
        "off_over_on_min": min(per[False]) / min(per[True]),
        "calls_per_round": n,
        "rounds": rounds,
        "onednn_on_all_ms": per[True],
        "onednn_off_all_ms": per[False],
        "first_call_on_ms": first[True],
        "first_call_off_ms": first[False],
    }


def mode_kernels(a: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    if a.device != "cpu":
        _log("kernels mode measures CPU kernels; running on the CPU")
    cpus = os.cpu_count() or 1
    threads = a.kernel_threads or sorted({1, cpus})
    out = {}
    for n in threads:
        _log(f"kernels: {n} thread(s) ...")
        out[str(n)] = runner.kernels(n)
        if "error" in out[str(n)]:
            _log(f"    failed: {out[str(n)]['error']}")
    return {"threads": out}


def render_kernels(result: dict[str, Any]) -> str:
    rows = []
    for n, r in result["threads"].items():
        if "error" in r:
            rows.append([n, "", f"FAILED: {r['error']}", "", "", "", "", "", ""])
            continue
        for k in r["results"]:
            rows.append(
                [
                    str(r["torch_threads"]),
                    str(k["batch_size"]),
                    k["what"],
                    f"{k['onednn_on_ms']:.2f}",
                    f"{k['onednn_off_ms']:.2f}",
                    f"{k['off_over_on']:.2f}",
                    f"{k['off_over_on_min']:.2f}",
                    f"{k['first_call_on_ms']:.0f} / {k['first_call_off_ms']:.0f}",
                    _pct(r.get("other_load")),
                ]
            )
    return _table(
        [
            "threads",
            "batch",
            "what",
            "oneDNN on ms (median)",
            "oneDNN off ms (median)",
            "off / on",
            "off / on (best rounds)",
            "first call ms (on / off)",
            "other load",
        ],
        rows,
    )
