"""Training speed of deeprnn against the book's own code (D2L 9.3), side by side on one device.

Modes:

* ``compare`` (default): the book's program (d2l 0.17.6; ``bench/d2l_book.py``, or the shared
  ``d2l_reference.py`` with ``--d2l-impl reference``), deeprnn with the ``d2l-9.3`` preset and ``fast=True``,
  and deeprnn with ``fast=False`` (the eager loop). Each runs in its own subprocess, one after the other, so
  each has a fresh process and its own peak memory.
* ``batch-sweep``: deeprnn's fast path over ``--batch-sizes`` (learning rate unchanged, fixed epochs; a
  throughput measurement, not a quality one), on the whole training split by default so large batches fit,
  plus the book at batch 32 on the same tokens unless ``--skip-d2l``.
* ``kernels``: the CPU kernel question behind the fast path: the LSTM forward+backward, the whole training
  step and the forward alone, with oneDNN on and off, for each thread count in ``--kernel-threads``.

Prints markdown tables at the end; ``--json OUT`` keeps every number, the per-epoch histories, the device,
the torch version, the CPU count and the exact command line.

    python bench/train_speed.py --device cpu --epochs 5
    python bench/train_speed.py --device cpu --mode batch-sweep --epochs 2 --batch-sizes 32,128
    python bench/train_speed.py --device cpu --mode kernels
    python bench/train_speed.py --device cuda --json bench/cuda.json          # 500 epochs, the book's run
    python bench/train_speed.py --device cpu --skip-d2l --repeats 3 --against /tmp/old   # no-slowdown check

``--against PATH`` (compare mode) also runs the worker of another checkout of deeprnn (an earlier commit:
``git worktree add /tmp/old REF``) with its own code, interleaved with this one, and prints this code's
speed relative to it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_D2L_SCRIPT = REPO.parent / "shared" / "bench" / "d2l_reference.py"
BOOK_SCRIPT = BENCH / "d2l_book.py"
BOOK_MAX_TOKENS = 10000  # the book trains on the first 10,000 characters
BOOK = "book (d2l 0.17.6)"
FAST = "deeprnn fast"
EAGER = "deeprnn fast=False"
AGAINST = "deeprnn fast, --against checkout"


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Training speed: deeprnn vs the book's d2l code (D2L 9.3), side by side on one device.",
    )
    p.add_argument("--mode", choices=["compare", "batch-sweep", "kernels"], default="compare", help="default: compare")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--epochs", type=int, default=None, help="default: 5 on cpu, 500 (the book's) on cuda")
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding timemachine.txt, read in place (default: <repo>/../shared/data)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument(
        "--batch-sizes", type=_int_list, default=None, help="batch-sweep: default 32,128,512,2048; kernels: default 32"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="training tokens; 0 = the whole training split. Default: the book's 10000 in compare, "
        "the whole training split in batch-sweep",
    )
    p.add_argument("--skip-d2l", action="store_true", help="do not run the book's code")
    p.add_argument("--against", type=Path, default=None, help="compare: also time another deeprnn checkout's fast path")
    p.add_argument(
        "--repeats", type=int, default=1, help="run every program this many times (interleaved); tables show medians"
    )
    p.add_argument(
        "--d2l-impl",
        choices=["book", "reference"],
        default="book",
        help="book: bench/d2l_book.py (per-epoch history, held-out ppl); reference: the shared "
        "d2l_reference.py (final line only)",
    )
    p.add_argument(
        "--d2l-script",
        type=Path,
        default=DEFAULT_D2L_SCRIPT,
        help="the shared reference script (default: <repo>/../shared/bench/d2l_reference.py)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every program (torch.set_num_threads and OMP/MKL_NUM_THREADS)",
    )
    p.add_argument("--kernel-threads", type=_int_list, default=None, help="kernels: default 1,<cpu count>")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default=None,
        help="deeprnn's train.precision (default: the preset's, auto = bf16 autocast on CUDA); "
        "fp32 compares like for like with the book",
    )
    p.add_argument(
        "--target-ppl",
        type=float,
        default=1.05,
        help="report the time to reach this training perplexity (default: 1.05)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed to each subprocess (default: 3600)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="on a shared machine: wait up to this many seconds before each run for the other load "
        "to drop below --max-other-load (default: 0, no waiting)",
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.1,
        help="share of the machine's CPU used by other processes above which a run counts as "
        "disturbed (with --quiet-wait: waited out before, and the run retried up to twice; default: 0.1)",
    )
    # internal: one program in a fresh process, printing one JSON line
    p.add_argument("--_worker", choices=["deeprnn", "kernels"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--fast", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device is None:
        a.device = _default_device()
    if a.epochs is None:
        a.epochs = 500 if a.device == "cuda" else 5
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    return a


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


# ----------------------------------------------------------------------------------------------------
# workers (run in a fresh subprocess; print one JSON line on stdout)
# ----------------------------------------------------------------------------------------------------
def _import_repo() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def worker_deeprnn(a: argparse.Namespace) -> dict[str, Any]:
    """deeprnn with the book's preset, built exactly as the pipeline builds it (deeprnn.pipeline)."""
    _import_repo()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from deeprnn.config import preset_config
    from deeprnn.generate import generate
    from deeprnn.pipeline import build_trainer, load_data
    from deeprnn.training.progress import EpochStats

    train: dict[str, Any] = {"epochs": a.epochs, "device": a.device, "fast": bool(a.fast)}
    if a.batch_size:
        train["batch_size"] = a.batch_size
    if a.precision:
        train["precision"] = a.precision
    overrides: dict[str, Any] = {"train": train, "data": {"url": str(Path(a.data) / "timemachine.txt")}}
    if a.max_tokens is not None:
        overrides["data"]["max_tokens"] = a.max_tokens
    cfg = preset_config("d2l-9.3", overrides)

    # The stages as the pipeline's tasks run them (deeprnn.pipeline).
    data = load_data(cfg)
    vocab, splits = data.vocab, data.splits
    trainer = build_trainer(cfg, len(vocab), splits)
    model, device = trainer.model, trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    history: list[EpochStats] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = trainer.fit(on_epoch=history.append)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    train_cpu_s = time.process_time() - cpu0

    samples = {p: generate(model, vocab, p, cfg.sample.num_chars, token=cfg.data.token) for p in cfg.sample.prefixes}
    hist = [
        {
            "epoch": h.epoch,
            "train_perplexity": h.train_perplexity,
            "seconds": h.seconds,
            "tokens": int(round(h.tokens_per_sec * h.seconds)),
            "tokens_per_sec": h.tokens_per_sec,
            "heldout_perplexity": h.heldout_perplexity,
        }
        for h in history
    ]
    tokens_total = sum(h["tokens"] for h in hist)
    out: dict[str, Any] = {
        "impl": "deeprnn",
        "fast": bool(a.fast),
        "step_mode": result.step_mode,
        "precision": getattr(result, "precision", "fp32"),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "epochs": result.epochs_done,
        "batch_size": cfg.train.batch_size,
        "num_steps": cfg.train.num_steps,
        "max_tokens": cfg.data.max_tokens,
        "train_tokens_available": int(splits.train.numel()),
        "vocab_size": len(vocab),
        "vocab_sha1": _sha1("\n".join(vocab.idx_to_token)),
        "tokens_total": tokens_total,
        "tokens_per_epoch": tokens_total / max(1, len(hist)),
        "train_wall_s": wall,
        "train_cpu_s": train_cpu_s,  # all threads; robust to other load when --threads 1
        "fit_train_seconds": result.train_seconds,
        "epoch_seconds_total": sum(h["seconds"] for h in hist),
        "tokens_per_s": result.tokens_per_sec,  # FitResult: tokens / summed epoch times
        "overall_tokens_per_s": tokens_total / wall if wall > 0 else 0.0,
        "final_train_perplexity": result.final_train_perplexity,
        "heldout_perplexity": hist[-1]["heldout_perplexity"] if hist else None,
        "best_heldout_perplexity": result.best_heldout_perplexity,
        "samples": samples,
        "history": hist,
    }
    if device.type == "cuda":
        out["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_mem_kind"] = "cuda_max_allocated"
    return out


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


# ----------------------------------------------------------------------------------------------------
# running subprocesses
# ----------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sha1(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()


def _busy_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (Linux /proc/stat), to detect other load."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one program; return its last JSON line plus its wall time, peak RSS and the machine's other load."""
    busy0 = _busy_cpu_seconds()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(REPO))
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            if hasattr(os, "wait4"):  # this child's own rusage, not the max over all children
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            else:  # pragma: no cover - not Linux/macOS
                proc.wait()
                usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            timer.cancel()
        process_s = time.perf_counter() - t0
        busy1 = _busy_cpu_seconds()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    child_cpu = usage.ru_utime + usage.ru_stime
    info: dict[str, Any] = {
        "cmd": cmd,
        "returncode": proc.returncode,
        "process_s": process_s,
        "peak_rss_bytes": int(usage.ru_maxrss * scale),
        "cpu_s": child_cpu,
    }
    if busy0 is not None and busy1 is not None:
        # CPU time spent by anything other than this child while it ran, as a share of the machine
        other = max(0.0, (busy1 - busy0) - child_cpu)
        info["other_load"] = other / (process_s * (os.cpu_count() or 1))
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        info["error"] = (stderr.strip().splitlines() or ["(no stderr)"])[-1][:500]
        info["stderr_tail"] = stderr[-4000:]
        return info
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        info["error"] = f"unparsable JSON line: {exc}"
        return info
    data.update(info)
    return data


def _other_load_now(window_s: float = 2.0) -> float | None:
    """Share of the machine's CPU busy right now (this process sleeps meanwhile, so it is all other load)."""
    b0 = _busy_cpu_seconds()
    time.sleep(window_s)
    b1 = _busy_cpu_seconds()
    if b0 is None or b1 is None:
        return None
    return (b1 - b0) / (window_s * (os.cpu_count() or 1))


def wait_quiet(max_wait_s: float, max_load: float) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use less than ``max_load`` of the CPUs."""
    deadline = time.monotonic() + max_wait_s
    load = _other_load_now()
    while load is not None and load > max_load and time.monotonic() < deadline:
        _log(f"    machine busy ({100 * load:.0f}% of the CPUs used by other processes); waiting ...")
        time.sleep(5.0)
        load = _other_load_now()
    return load


class Runner:
    """Builds each program's command line and runs it."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.env = dict(os.environ)
        if a.threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                self.env[var] = str(a.threads)
        self.env.setdefault("PYTHONWARNINGS", "ignore")  # keep d2l's warnings out of stderr tails

    def run(self, cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        """run_child, on a quiet machine if asked: wait before, retry (twice at most) a disturbed run."""
        a = self.a
        tries: list[dict[str, Any]] = []
        for attempt in range(3 if a.quiet_wait > 0 else 1):
            before = wait_quiet(a.quiet_wait, a.max_other_load) if a.quiet_wait > 0 else None
            r = run_child(cmd, env or self.env, a.timeout)
            r["other_load_before"], r["attempt"] = before, attempt + 1
            tries.append(r)
            if "error" in r or (r.get("other_load") or 0.0) <= a.max_other_load or a.quiet_wait <= 0:
                return r
            if attempt < 2:
                _log(f"    disturbed: other processes used {100 * r['other_load']:.0f}% of the CPUs; running again")
        return min(tries, key=lambda t: t.get("other_load") or 0.0)  # every try disturbed: the least disturbed

    def _common(self, epochs: int | None = None) -> list[str]:
        a = self.a
        cmd = ["--device", a.device, "--epochs", str(epochs or a.epochs), "--data", str(a.data)]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        if a.precision:
            cmd += ["--precision", a.precision]
        return cmd

    def deeprnn(
        self, fast: bool, batch_size: int | None = None, max_tokens: int | None = None, checkout: Path = REPO
    ) -> dict[str, Any]:
        """deeprnn's worker from ``checkout`` (this one by default), which imports that checkout's code."""
        script = checkout.resolve() / "bench" / "train_speed.py"
        cmd = [sys.executable, str(script), "--_worker", "deeprnn", "--fast", str(int(fast))]
        cmd += self._common()
        if batch_size:
            cmd += ["--batch-size", str(batch_size)]
        if max_tokens is not None:
            cmd += ["--max-tokens", str(max_tokens)]
        return self._finish(self.run(cmd))

    def book(self, batch_size: int = 32, max_tokens: int = BOOK_MAX_TOKENS) -> dict[str, Any]:
        a = self.a
        if a.d2l_impl == "reference":
            cmd = [
                sys.executable,
                str(a.d2l_script),
                str(a.data),
                "--device",
                a.device,
                "--epochs",
                str(a.epochs),
                "--max-tokens",
                str(max_tokens),
                "--batch-size",
                str(batch_size),
            ]
            return self._finish(_normalize_reference(self.run(cmd)))
        cmd = [
            sys.executable,
            str(BOOK_SCRIPT),
            str(a.data),
            "--device",
            a.device,
            "--epochs",
            str(a.epochs),
            "--max-tokens",
            str(max_tokens),
            "--batch-size",
            str(batch_size),
            "--target-ppl",
            str(a.target_ppl),
        ]
        if a.threads:
            cmd += ["--threads", str(a.threads)]
        return self._finish(self.run(cmd))

    def kernels(self, threads: int) -> dict[str, Any]:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_worker",
            "kernels",
            "--threads",
            str(threads),
            "--device",
            "cpu",
            "--epochs",
            "1",
        ]
        if self.a.batch_sizes:
            cmd += ["--batch-sizes", ",".join(map(str, self.a.batch_sizes))]
        env = dict(self.env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return self.run(cmd, env)

    def _finish(self, r: dict[str, Any]) -> dict[str, Any]:
        """Derived numbers common to every program: steady-state speed, time to the target perplexity."""
        if "error" in r:
            return r
        if r.get("train_cpu_s"):
            r["tokens_per_cpu_s"] = r["tokens_total"] / r["train_cpu_s"]
        if "peak_mem_bytes" not in r:
            r["peak_mem_bytes"], r["peak_mem_kind"] = r["peak_rss_bytes"], "rss"
        hist = r.get("history")
        if hist:
            later = [h["tokens_per_sec"] for h in hist[1:]] or [hist[0]["tokens_per_sec"]]
            r["steady_tokens_per_s"] = statistics.median(later)  # first epoch excluded (warm-up, capture)
            r["first_epoch_s"] = hist[0]["seconds"]
            elapsed, r["time_to_target_s"], r["target_epoch"] = 0.0, None, None
            for h in hist:
                elapsed += h["seconds"]
                if h["train_perplexity"] <= self.a.target_ppl:
                    r["time_to_target_s"], r["target_epoch"] = elapsed, h["epoch"]
                    break
        return r


def _normalize_reference(r: dict[str, Any]) -> dict[str, Any]:
    """The shared d2l_reference.py's JSON in this benchmark's field names (it has no per-epoch history)."""
    if "error" in r:
        return r
    lines = r.get("samples") or []
    r.update(
        {
            "tokens_per_s": r.get("d2l_tokens_per_s"),  # the book's printed speed: the last epoch only
            "train_wall_s": r.get("wall_s"),
            "final_train_perplexity": r.get("perplexity"),  # printed with one decimal by d2l
            "heldout_perplexity": None,
            "samples": {"time traveller": lines[0] if lines else "", "traveller": lines[1] if len(lines) > 1 else ""},
        }
    )
    return r


# ----------------------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from repeated runs: the run with the median overall tokens/s, with medians of the speeds."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error", "failed"), "runs": len(runs)}
    ok.sort(key=lambda r: r.get("overall_tokens_per_s") or 0.0)
    row = dict(ok[(len(ok) - 1) // 2])
    for key in (
        "tokens_per_s",
        "overall_tokens_per_s",
        "steady_tokens_per_s",
        "tokens_per_cpu_s",
        "train_wall_s",
        "time_to_target_s",
    ):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            row[key] = statistics.median(values)
            row[key + "_all"] = values
    row["repeats_ok"] = len(ok)
    return row


def _ratios(row: dict[str, Any], base: dict[str, Any] | None) -> dict[str, float | None]:
    """deeprnn relative to the book: >1 means deeprnn is faster."""
    if not base or "error" in base or "error" in row:
        return {}

    def div(x: Any, y: Any) -> float | None:
        return x / y if x and y else None

    return {
        "tokens_per_s_x": div(row.get("tokens_per_s"), base.get("tokens_per_s")),
        "overall_tokens_per_s_x": div(row.get("overall_tokens_per_s"), base.get("overall_tokens_per_s")),
        "steady_tokens_per_s_x": div(row.get("steady_tokens_per_s"), base.get("steady_tokens_per_s")),
        "wall_x": div(base.get("train_wall_s"), row.get("train_wall_s")),  # book wall / deeprnn wall
        "tokens_per_cpu_s_x": div(row.get("tokens_per_cpu_s"), base.get("tokens_per_cpu_s")),
    }


def _rotated(programs: list, rep: int) -> list:
    """The programs in a different order each repeat, so none always runs first (right after the idle check)."""
    k = rep % len(programs)
    return programs[k:] + programs[:k]


def mode_compare(a: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    max_tokens = a.max_tokens if a.max_tokens is not None else BOOK_MAX_TOKENS
    book_tokens = max_tokens if max_tokens > 0 else _train_split_size(a.data)
    programs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if not a.skip_d2l:
        programs.append((BOOK, lambda: runner.book(32, book_tokens)))
    programs.append((FAST, lambda: runner.deeprnn(True, max_tokens=max_tokens)))
    programs.append((EAGER, lambda: runner.deeprnn(False, max_tokens=max_tokens)))
    if a.against:
        programs.append((AGAINST, lambda: runner.deeprnn(True, max_tokens=max_tokens, checkout=a.against)))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in programs}
    for rep in range(a.repeats):
        for name, fn in _rotated(programs, rep):
            _log(f"[{rep + 1}/{a.repeats}] {name}: {a.epochs} epochs on {a.device} ...")
            r = fn()
            runs[name].append(r)
            _log(f"    {_one_line(r)}")
    rows = {name: _summarize(rs) for name, rs in runs.items()}
    base = rows.get(BOOK)
    for name, row in rows.items():
        if name != BOOK:
            row["vs_book"] = _ratios(row, base)
    if AGAINST in rows:
        rows[FAST]["vs_against"] = _ratios(rows[FAST], rows[AGAINST])
    return {"rows": rows, "runs": runs, "max_tokens": max_tokens}


def mode_sweep(a: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    sizes = a.batch_sizes or [32, 128, 512, 2048]
    max_tokens = a.max_tokens if a.max_tokens is not None else 0
    tokens = max_tokens if max_tokens > 0 else _train_split_size(a.data)
    programs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if not a.skip_d2l:
        programs.append((f"{BOOK}, batch 32", lambda: runner.book(32, tokens)))
    for b in sizes:
        programs.append((f"{FAST}, batch {b}", lambda b=b: runner.deeprnn(True, batch_size=b, max_tokens=tokens)))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in programs}
    for rep in range(a.repeats):
        for name, fn in _rotated(programs, rep):
            _log(f"[{rep + 1}/{a.repeats}] {name}: {a.epochs} epochs, {tokens} training tokens on {a.device} ...")
            r = fn()
            runs[name].append(r)
            _log(f"    {_one_line(r)}")
    rows = {name: _summarize(rs) for name, rs in runs.items()}
    base = rows.get(f"{BOOK}, batch 32")
    for name, row in rows.items():
        if not name.startswith(BOOK):
            row["vs_book"] = _ratios(row, base)
    return {"rows": rows, "runs": runs, "max_tokens": tokens}


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


def _train_split_size(data: Path) -> int:
    """Tokens in deeprnn's training split of the whole corpus (the book's test fraction held out)."""
    _import_repo()
    from deeprnn.config import DataConfig
    from deeprnn.data import book_tokenize as tokenize

    d = DataConfig()
    n = len(tokenize.flatten(tokenize.tokenize(tokenize.read_lines(data / "timemachine.txt"), d.token)))
    test_start = n - int(round(n * d.test_fraction))
    return test_start - int(round(n * d.val_fraction))


# ----------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------
def _one_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    return (
        f"{_num(r.get('tokens_per_s'))} tok/s (epochs), {_num(r.get('overall_tokens_per_s'))} overall, "
        f"wall {_sec(r.get('train_wall_s'))}, train ppl {_ppl(r.get('final_train_perplexity'))}, "
        f"other load {_pct(r.get('other_load'))}"
        + (f", {r['step_mode']} {r.get('precision', '')}" if r.get("step_mode") else "")
    )


def _num(x: Any) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _sec(x: Any) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _ppl(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _x(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def _mem(r: dict[str, Any]) -> str:
    kind = "GPU" if r.get("peak_mem_kind") == "cuda_max_allocated" else "RSS"
    return f"{_mib(r.get('peak_mem_bytes'))} {kind}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _spread(r: dict[str, Any], key: str) -> str:
    values = r.get(key + "_all") or []
    if len(values) < 2:
        return ""
    return f" ({min(values):,.0f}-{max(values):,.0f})"


def render_speed(result: dict[str, Any], a: argparse.Namespace, batch_col: bool = False) -> str:
    header = (
        ["program", "step"]
        + (["batch", "batches/epoch"] if batch_col else [])
        + [
            "tok/s (epochs)",
            "tok/s (steady)",
            "tok/s (overall)",
            "train wall",
            "x book tok/s",
            "x book wall",
            f"t to ppl<={a.target_ppl:g}",
            "final train ppl",
            "held-out ppl",
            "peak mem",
            "tok/CPU-s",
            "other load",
        ]
    )
    rows = []
    for name, r in result["rows"].items():
        if "error" in r:
            rows.append([name, ""] + (["", ""] if batch_col else []) + [f"FAILED: {r['error']}"] + [""] * 11)
            continue
        vs = r.get("vs_book") or {}
        target = (
            "-" if r.get("time_to_target_s") is None else f"{r['time_to_target_s']:.1f} s (ep {r.get('target_epoch')})"
        )
        if r.get("history") is None:
            target = "n/a"
        step = f"{r['step_mode']}, {r.get('precision', 'fp32')}" if r.get("step_mode") else "eager, fp32"
        cols = [name, step]
        if batch_col:
            per_batch = r["batch_size"] * r.get("num_steps", 35)
            cols += [
                str(r["batch_size"]),
                f"{r['tokens_per_epoch'] / per_batch:.0f}" if r.get("tokens_per_epoch") else "-",
            ]
        cols += [
            _num(r.get("tokens_per_s")) + _spread(r, "tokens_per_s"),
            _num(r.get("steady_tokens_per_s")),
            _num(r.get("overall_tokens_per_s")) + _spread(r, "overall_tokens_per_s"),
            _sec(r.get("train_wall_s")),
            _x(vs.get("tokens_per_s_x")) if vs else ("1.00x" if name.startswith(BOOK) else "-"),
            _x(vs.get("wall_x")) if vs else ("1.00x" if name.startswith(BOOK) else "-"),
            target,
            _ppl(r.get("final_train_perplexity")),
            _ppl(r.get("heldout_perplexity")),
            _mem(r),
            _num(r.get("tokens_per_cpu_s")),
            _pct(r.get("other_load")),
        ]
        rows.append(cols)
    return _table(header, rows)


def render_history(result: dict[str, Any]) -> str:
    """Training perplexity at a few epochs, per program: the runs should track each other."""
    named = {n: r["history"] for n, r in result["rows"].items() if r.get("history")}
    if not named:
        return ""
    epochs = max(len(h) for h in named.values())
    picks = sorted({e for e in (1, 2, 3, 5, 10, 20, 50, 100, 200, 300, 400, 500, epochs) if e <= epochs})
    rows = []
    for e in picks:
        row = [str(e)]
        for hist in named.values():
            h = next((x for x in hist if x["epoch"] == e), None)
            row.append(_ppl(h["train_perplexity"]) if h else "-")
        rows.append(row)
    return _table(["epoch"] + [f"{n} ppl" for n in named], rows)


def render_against(result: dict[str, Any], a: argparse.Namespace) -> str:
    """This checkout's fast path relative to the ``--against`` checkout's, measured in the same run."""
    fast, other = result["rows"].get(FAST, {}), result["rows"].get(AGAINST)
    vs = fast.get("vs_against")
    if other is None or not vs:
        return ""
    same = [h["train_perplexity"] for h in fast.get("history", [])] == [
        h["train_perplexity"] for h in other.get("history", [])
    ]
    header = ["this vs " + str(a.against), "tok/s (epochs)", "tok/s (overall)", "train wall", "same perplexities"]
    row = [
        FAST,
        _x(vs.get("tokens_per_s_x")),
        _x(vs.get("overall_tokens_per_s_x")),
        _x(vs.get("wall_x")),
        "yes" if same else "NO",
    ]
    return _table(header, [row])


def render_samples(result: dict[str, Any]) -> str:
    lines = []
    for name, r in result["rows"].items():
        for prefix, text in (r.get("samples") or {}).items():
            lines.append(f"- {name}, '{prefix}': `{text}`")
    return "\n".join(lines)


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


def environment(a: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "command": " ".join(shlex.quote(x) for x in [sys.executable, *argv]),
        "argv": argv,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_name": _cpu_name(),
        "torch_default_threads": torch.get_num_threads(),
        "threads": a.threads,
        "mode": a.mode,
        "device": a.device,
        "epochs": a.epochs,
        "repeats": a.repeats,
        "data": str(a.data.resolve()),
        "d2l_impl": a.d2l_impl,
        "precision": a.precision or "preset",
        "target_ppl": a.target_ppl,
    }
    try:
        import d2l  # noqa: F401

        env["d2l"] = getattr(d2l, "__version__", "?")
    except Exception:
        env["d2l"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    a = parse_args(argv[1:])
    if a._worker:
        fn = worker_deeprnn if a._worker == "deeprnn" else worker_kernels
        print(json.dumps(fn(a)))
        return 0
    if not (a.data / "timemachine.txt").is_file():
        _log(f"no timemachine.txt in {a.data}; pass --data DIR")
        return 2
    if a.mode != "kernels" and not a.skip_d2l and a.d2l_impl == "reference" and not a.d2l_script.is_file():
        _log(f"no d2l reference script at {a.d2l_script}; pass --d2l-script, --d2l-impl book or --skip-d2l")
        return 2
    env = environment(a, [str(Path(argv[0])), *argv[1:]])
    runner = Runner(a)
    t0 = time.perf_counter()
    if a.mode == "compare":
        result = mode_compare(a, runner)
    elif a.mode == "batch-sweep":
        result = mode_sweep(a, runner)
    else:
        result = mode_kernels(a, runner)
    env["total_s"] = time.perf_counter() - t0
    device_names = [r.get("device_name") for r in result.get("rows", result.get("threads", {})).values()]
    env["device_name"] = next((d for d in device_names if d), _cpu_name() if a.device == "cpu" else None)

    title = (
        f"## {a.mode} on {a.device} ({env['device_name']}), torch {env['torch']}, {env['cpu_count']} CPUs, "
        f"threads {a.threads or env['torch_default_threads']}"
    )
    parts = [title]
    if a.mode == "kernels":
        parts.append(render_kernels(result))
    else:
        parts.append(f"{a.epochs} epochs, {result['max_tokens'] or 'all'} training tokens, repeats {a.repeats}")
        parts.append(render_speed(result, a, batch_col=a.mode == "batch-sweep"))
        against = render_against(result, a) if a.mode == "compare" else ""
        if against:
            parts += ["Against the other checkout (>1: this code is faster)", against]
        hist = render_history(result)
        if hist and a.mode == "compare":
            parts += ["Training perplexity by epoch", hist]
        samples = render_samples(result)
        if samples and a.mode == "compare":
            parts += ["Greedy samples (50 characters)", samples]
    parts.append(f"`{env['command']}`")
    print("\n\n".join(parts))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"env": env, **result}, indent=1, default=str))
        _log(f"wrote {a.json}")
    failed = [n for n, r in result.get("rows", result.get("threads", {})).items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
