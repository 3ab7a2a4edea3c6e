"""Generation speed: batched against one prefix at a time, and the served model's latency.

1. Library: the book's model shape (LSTM 2 x 256, the book's 28-token vocabulary; random weights, which
   cost the same per step as trained ones), ``--prefixes`` prefixes of different lengths x ``--tokens``
   tokens, greedy; ``generate_batch`` (one forward step per token for all prefixes) and ``generate`` per
   prefix, interleaved ``--repeats`` times in this one process, medians compared. Both must print the
   same text.
2. Server: the same model saved as deeprnn's pyfunc and served by a real ``mlflow models serve
   --env-manager local`` on 127.0.0.1: p50/p95 latency of ``--requests`` single-prefix 50-token requests,
   one 64-prefix request, and the time to refuse a request for more than the bound (num_tokens 100000000).

    python bench/generation_speed.py                       # about a minute on 2 cores
    python bench/generation_speed.py --threads 1 --json bench/results/cpu-generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # deeprnn, and the tests' free_port
BOOK = REPO.parent / "shared" / "data" / "timemachine.txt"

import torch  # noqa: E402
from ports import free_port  # noqa: E402

from deeprnn.config import preset_config  # noqa: E402
from deeprnn.data.book_tokenize import flatten, preprocess_lines, tokenize  # noqa: E402
from deeprnn.data.vocab import Vocab  # noqa: E402
from deeprnn.generate import generate, generate_batch  # noqa: E402
from deeprnn.model import RNNLM  # noqa: E402
from deeprnn.training import checkpoint  # noqa: E402


def book_setup(num_prefixes: int) -> tuple[Vocab, list[str]]:
    """The book's vocabulary and ``num_prefixes`` prefixes (3 to 40 characters) cut from its lines; without
    the corpus, the 26 letters, space and <unk> and prefixes of a fixed sentence."""
    if BOOK.is_file():
        lines = preprocess_lines(BOOK.read_text(encoding="utf-8"))
        vocab = Vocab(flatten(tokenize(lines, "char")))
        lines = [line for line in lines if len(line) >= 40]
    else:
        vocab = Vocab(list("abcdefghijklmnopqrstuvwxyz "))
        lines = ["the time traveller for so it will be convenient to speak of him"] * num_prefixes
    return vocab, [lines[i * 7 % len(lines)][: 3 + (i * 11) % 38] for i in range(num_prefixes)]


def library(vocab: Vocab, prefixes: list[str], tokens: int, repeats: int) -> dict[str, Any]:
    """Seconds per run (median) of batched and one-at-a-time greedy generation, and whether they agree."""
    torch.manual_seed(0)
    model = RNNLM(len(vocab), "lstm", 256, 2).eval()
    generate_batch(model, vocab, prefixes[:4], 5)  # warm-up: first-call allocations
    batched, single, same = [], [], True
    for _ in range(repeats):  # interleaved, so both see the same machine load
        started = time.perf_counter()
        a = generate_batch(model, vocab, prefixes, tokens)
        batched.append(time.perf_counter() - started)
        started = time.perf_counter()
        b = [generate(model, vocab, p, tokens) for p in prefixes]
        single.append(time.perf_counter() - started)
        same = same and a == b
    return {
        "batched_s": statistics.median(batched),
        "one_at_a_time_s": statistics.median(single),
        "identical": same,
        "model": model,
    }


def save_served_model(model: RNNLM, vocab: Vocab, folder: Path) -> Path:
    """The model as deeprnn logs it (pyfunc from code, checkpoint artifact, the library as code), saved locally."""
    import mlflow
    import pandas as pd

    import deeprnn
    from deeprnn.tracking.model_registry import _PYFUNC_CODE, _signature

    ckpt = checkpoint.save(
        folder / "model.pt", checkpoint.make_payload(preset_config("d2l-9.3"), vocab, model, epoch=0)
    )
    path = folder / "served"
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(_PYFUNC_CODE),
        artifacts={"checkpoint": str(ckpt)},
        code_paths=[str(Path(deeprnn.__file__).parent)],
        signature=_signature(),
        input_example=pd.DataFrame({"prefix": ["time traveller"]}),
    )
    return path


def serve(model_path: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow models serve`` on the saved model; wait until /ping answers."""
    import requests

    port = free_port()
    env = {
        **os.environ,
        "DEEPRNN_DEVICE": "cpu",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        str(model_path),
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("mlflow models serve did not answer in 180 s")


def server_latency(url: str, prefixes: list[str], requests_n: int) -> dict[str, Any]:
    """Latencies (ms) of single 50-token requests, one request of all prefixes, and a refused request."""
    import requests

    session = requests.Session()

    def post(body: dict[str, Any]) -> tuple[float, int]:
        started = time.perf_counter()
        response = session.post(f"{url}/invocations", json=body, timeout=120)
        return (time.perf_counter() - started) * 1000, response.status_code

    post({"dataframe_records": [{"prefix": "time traveller"}], "params": {"num_tokens": 50}})  # warm-up
    single = [
        post({"dataframe_records": [{"prefix": "time traveller"}], "params": {"num_tokens": 50}})
        for _ in range(requests_n)
    ]
    assert all(code == 200 for _, code in single)
    batch_ms, code = post({"inputs": {"prefix": prefixes}, "params": {"num_tokens": 200}})
    assert code == 200
    refused = [
        post({"dataframe_records": [{"prefix": "time traveller"}], "params": {"num_tokens": 100_000_000}})
        for _ in range(10)
    ]
    assert all(code == 400 for _, code in refused)
    times = sorted(ms for ms, _ in single)
    return {
        "single_50_p50_ms": statistics.median(times),
        "single_50_p95_ms": times[max(0, int(round(0.95 * len(times))) - 1)],
        "batch_ms": batch_ms,
        "refused_median_ms": statistics.median(ms for ms, _ in refused),
        "refused_max_ms": max(ms for ms, _ in refused),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--threads", type=int, help="torch threads for the library part (default: torch's own)")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--json", help="Also write every figure to this file.")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)  # a busy shared machine: several threads per tiny op only wait
    vocab, prefixes = book_setup(args.prefixes)
    lib = library(vocab, prefixes, args.tokens, args.repeats)
    model = lib.pop("model")
    rows = args.prefixes * args.tokens
    print(
        f"\nLibrary: LSTM 2x256, {len(vocab)} tokens, {args.prefixes} prefixes x {args.tokens} tokens, greedy, "
        f"CPU ({torch.get_num_threads()} threads), median of {args.repeats}"
    )
    print("| way | seconds | tokens/s | speed-up |\n| --- | --- | --- | --- |")
    print(
        f"| one prefix at a time (`generate`) | {lib['one_at_a_time_s']:.2f} "
        f"| {rows / lib['one_at_a_time_s']:,.0f} | 1.0x |"
    )
    print(
        f"| batched (`generate_batch`) | {lib['batched_s']:.2f} | {rows / lib['batched_s']:,.0f} | "
        f"{lib['one_at_a_time_s'] / lib['batched_s']:.1f}x |"
    )
    print(f"same text both ways: {'yes' if lib['identical'] else 'NO'}")
    result: dict[str, Any] = {
        "library": lib,
        "args": vars(args),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if not args.skip_server:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_served_model(model, vocab, Path(tmp))
            proc, url = serve(path, Path(tmp) / "serve.log")
            try:
                srv = server_latency(url, prefixes, args.requests)
            finally:
                os.killpg(proc.pid, 15)
                proc.wait(timeout=30)
        result["server"] = srv
        print(f"\nServer: mlflow models serve --env-manager local, 127.0.0.1, {args.requests} requests")
        print("| request | ms |\n| --- | --- |")
        print(f"| 1 prefix x 50 tokens, p50 | {srv['single_50_p50_ms']:.1f} |")
        print(f"| 1 prefix x 50 tokens, p95 | {srv['single_50_p95_ms']:.1f} |")
        print(f"| {args.prefixes} prefixes x 200 tokens, one request | {srv['batch_ms']:.0f} |")
        print(
            f"| refused (num_tokens 100000000 -> 400), median / max of 10 "
            f"| {srv['refused_median_ms']:.1f} / {srv['refused_max_ms']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "command": " ".join(sys.argv)}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
