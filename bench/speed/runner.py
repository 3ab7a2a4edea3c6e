"""What the speed benchmarks share: the paths, the child processes each program runs in (one fresh
process per measurement, its peak memory and CPU time kept), the quiet-machine wait, and ``Runner``, which
builds each program's command line and summarizes its repeats."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
ENTRY = BENCH / "train_speed.py"  # every worker runs through the entry point, as another checkout's does


REPO = BENCH.parent


DEFAULT_DATA = REPO.parent / "shared" / "data"


DEFAULT_D2L_SCRIPT = REPO.parent / "shared" / "bench" / "d2l_reference.py"


BOOK_SCRIPT = BENCH / "d2l_book.py"


BOOK_MAX_TOKENS = 10000  # the book trains on the first 10,000 characters


BOOK = "book (d2l 0.17.6)"


FAST = "deeprnn fast"


EAGER = "deeprnn fast=False"


AGAINST = "deeprnn fast, --against checkout"


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def _import_repo() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


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
            str(ENTRY),
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


def _train_split_size(data: Path) -> int:
    """Tokens in deeprnn's training split of the whole corpus (the book's test fraction held out)."""
    _import_repo()
    from deeprnn.config import DataConfig
    from deeprnn.data import book_tokenize as tokenize

    d = DataConfig()
    lines = tokenize.preprocess_lines((data / "timemachine.txt").read_text(encoding="utf-8"))
    n = len(tokenize.flatten(tokenize.tokenize(lines, d.token)))
    test_start = n - int(round(n * d.test_fraction))
    return test_start - int(round(n * d.val_fraction))
