"""Your own text in one command, measured: ``deeprnn run --data-url TEXT --time-budget 2m`` (no other flag)
against hand-tuned commands for the same budget, on real texts of about 1 MB in several languages.

The texts are Debian's manual pages in German, French, Spanish, Russian and Chinese (``apt-get install
manpages-de manpages-fr manpages-es manpages-ru manpages-zh groff-base``), rendered to plain text with groff,
runs of spaces squeezed, pages appended in name order until the text holds ``--size`` bytes.

Every command runs the real CLI (Prefect's temporary API, a local MLflow store in a scratch folder, one token
cache per text so no run pays for tokenizing), one after the other, interleaved text by text so that the
machine's load falls on all of them alike. The table gives each run's test loss in nats per character (the
held-out last 10% of the text, the same tokens for every command), the training time against the budget, and
the wall time of the whole command. ``--nanogpt DIR`` also runs nanoGPT's documented CPU recipe (a checkout
of karpathy/nanoGPT) on the same text and split, for comparison.

    python bench/own_text.py                       # five texts, 2-minute budget
    python bench/own_text.py --langs de --budget 30s --hand 1
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

MAN = Path("/usr/share/man")
LANGS = {"de": "German", "fr": "French", "es": "Spanish", "ru": "Russian", "zh_CN": "Chinese"}
PACKAGES = "manpages-de manpages-fr manpages-es manpages-ru manpages-zh groff-base"


def hand_tuned(budget: str) -> list[list[str]]:
    """Hand-tuned commands for the same budget: the recipe a user found by hand (full-book's optimizer on the
    whole text, every character, 2 x 256, embedding 64, batch 32 x 64, AdamW 3e-3), with the time budget in
    place of its step count, and variations of it."""
    base = [
        "--preset", "full-book", "--normalize", "none", "--max-tokens", "0", "--val-fraction", "0",
        "--test-fraction", "0.1", "--num-layers", "2", "--num-hiddens", "256", "--embedding-dim", "64",
        "--dropout", "0", "--batch-size", "32", "--num-steps", "64", "--lr", "3e-3", "--epochs", "1000",
        "--time-budget", budget,
    ]  # fmt: skip
    return [
        base,  # the recipe: full-book's optimizer at a constant rate
        _with(base, "--batch-size", "8"),  # four times the steps: a CPU trains as many tokens a second at 8 rows
        [*base, "--lr-schedule", "warmup-stable-decay"],
        [*base, "--lr-schedule", "warmup-stable-decay", "--num-hiddens", "384"],
        [*base, "--lr-schedule", "warmup-cosine"],
    ]


def _with(command: list[str], flag: str, value: str) -> list[str]:
    """``command`` with ``flag``'s value replaced."""
    out = list(command)
    out[out.index(flag) + 1] = value
    return out


def render(page: Path) -> str:
    """A manual page as plain UTF-8 text (groff, no overstriking), runs of spaces squeezed."""
    source = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
    out = subprocess.run(
        ["groff", "-k", "-man", "-Tutf8", "-P-cbou"], input=source, capture_output=True, check=False
    ).stdout.decode("utf-8", errors="replace")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in out.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def assemble(lang: str, size: int, folder: Path) -> Path:
    """The manual pages of ``lang`` appended in name order until the text holds ``size`` bytes."""
    pages = sorted(p for p in (MAN / lang).glob("man*/*") if p.is_file())
    if not pages:
        sys.exit(f"no manual pages in {MAN / lang}: apt-get install {PACKAGES}")
    parts, total = [], 0
    for page in pages:
        text = render(page).encode("utf-8")
        parts.append(text)
        total += len(text)
        if total >= size:
            break
    path = folder / f"man-{lang}.txt"
    path.write_bytes(b"".join(parts)[:size].rsplit(b"\n", 1)[0] + b"\n")
    return path


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads, for runs side by side
    return env


def run_deeprnn(args: list[str], text: Path, work: Path, name: str, threads: int | None) -> dict[str, object]:
    """One ``deeprnn run`` on ``text`` with ``args``; its test loss, training seconds and wall time."""
    out = work / f"{name}.json"
    env = {**_env(threads), "MLFLOW_TRACKING_URI": f"sqlite:///{work / (name + '-mlflow.db')}"}
    env["DEEPRNN_CACHE_DIR"] = str(work / "cache")
    env.pop("PREFECT_API_URL", None)  # the temporary API, as on a fresh machine
    command = ["deeprnn", "run", "--data-url", str(text), *args, "--json", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"name": name, "error": (done.stderr or done.stdout).strip().splitlines()[-1:], "wall": wall}
    record = json.loads(out.read_text())
    metrics = record["metrics"]
    sized = [
        line.split(" - ", 1)[-1]
        for line in (done.stdout + done.stderr).splitlines()
        if "Task run 'size-to-text" in line
    ]
    return {
        "sized": sized,
        "name": name,
        "test_nats": math.log(metrics["test_perplexity"]),
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps_done"],
        "wall": wall,
        "samples": record["samples"],
    }


def run_nanogpt(checkout: Path, text: Path, work: Path, threads: int | None) -> dict[str, object]:
    """nanoGPT's documented CPU recipe (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 iterations,
    dropout 0) on ``text`` with its own char-level preparation (last 10% held out); its last val loss."""
    data = checkout / "data" / f"bench_{text.stem}"
    data.mkdir(exist_ok=True)
    (data / "input.txt").write_bytes(text.read_bytes())
    # Its own preparation, unchanged: it reads input.txt (present, so nothing is downloaded) and keeps the last
    # 10% for validation.
    (data / "prepare.py").write_bytes((checkout / "data" / "shakespeare_char" / "prepare.py").read_bytes())
    env = {**_env(threads), "PYTHONUTF8": "1"}  # it opens the text with the locale's encoding
    subprocess.run([sys.executable, "prepare.py"], cwd=data, env=env, check=True, capture_output=True)
    recipe = [
        "config/train_shakespeare_char.py", f"--dataset=bench_{text.stem}", "--device=cpu", "--compile=False",
        "--log_interval=100", "--block_size=64", "--batch_size=12", "--n_layer=4",
        "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0",
        "--eval_interval=2000", f"--out_dir={work / ('nanogpt-' + text.stem)}",
    ]  # fmt: skip
    started = time.perf_counter()
    command = [sys.executable, "train.py", *recipe]
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    (work / f"nanogpt-{text.stem}.log").write_text(done.stdout + done.stderr)
    losses = re.findall(r"val loss ([0-9.]+)", done.stdout)
    return {"name": "nanoGPT CPU recipe", "test_nats": float(losses[-1]) if losses else math.nan, "wall": wall}


def main() -> None:
    """Assemble the texts, run every command on each, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--langs", nargs="+", default=list(LANGS), choices=list(LANGS))
    parser.add_argument("--size", type=int, default=1_000_000, help="bytes of each text")
    parser.add_argument("--budget", default="2m")
    parser.add_argument("--hand", type=int, default=3, help="how many hand-tuned commands to run")
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT to run beside")
    parser.add_argument(
        "--parallel", type=int, default=1, help="commands at once, one thread each (side by side on a shared machine)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per command (default: 1 with --parallel, else torch's own)"
    )
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="deeprnn-own-text-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads or (1 if args.parallel > 1 else None)
    texts = {lang: assemble(lang, args.size, work) for lang in args.langs}
    rows: list[tuple[str, dict[str, object], list[str]]] = []
    for lang, text in texts.items():
        print(f"{LANGS[lang]}: {text} ({text.stat().st_size:,} bytes)", flush=True)
        commands = [["--time-budget", args.budget], *hand_tuned(args.budget)[: args.hand]]
        jobs: list[tuple[list[str], Callable[[], dict[str, object]]]] = [
            (flags, partial(run_deeprnn, flags, text, work, f"{lang}-{k}", threads)) for k, flags in enumerate(commands)
        ]
        if args.nanogpt:
            jobs.append((["nanoGPT"], partial(run_nanogpt, args.nanogpt, text, work, threads)))
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            results = list(pool.map(lambda job: job[1](), jobs))
        for k, ((flags, _), result) in enumerate(zip(jobs, results)):
            rows.append((LANGS[lang], result, flags))
            label = "default" if k == 0 else "nanoGPT" if flags == ["nanoGPT"] else f"hand {k}"
            print(f"  {label}: {_describe(result)}", flush=True)
            for note in result.get("sized", []):  # type: ignore[union-attr]
                print(f"    {note}", flush=True)
    print()
    print("| text | command | test loss (nats/char) | training s | steps | wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for lang, r, flags in rows:
        label = "deeprnn run --data-url TEXT " + " ".join(flags) if flags != ["nanoGPT"] else "nanoGPT CPU recipe"
        print(
            f"| {lang} | `{label}` | {_num(r.get('test_nats'), 3)} | {_num(r.get('train_seconds'), 1)} | "
            f"{r.get('steps', '')} | {_num(r.get('wall'), 0)} |"
        )
    (work / "results.json").write_text(json.dumps([[lang, r, flags] for lang, r, flags in rows], indent=1))
    print(f"\nscratch folder (logs, samples, results.json): {work}")


def _num(value: object, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def _describe(r: dict[str, object]) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    return f"test {_num(r.get('test_nats'), 3)} nats/char, training {_num(r.get('train_seconds'), 1)} s"


if __name__ == "__main__":
    main()
