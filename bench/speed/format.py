"""The cells of the speed tables: numbers, seconds, perplexities, ratios, memory and spreads as text."""

from __future__ import annotations

import math
from typing import Any


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
