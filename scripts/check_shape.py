"""Check the shape of the product code: no module over 400 lines, no function over 60.

    python scripts/check_shape.py            # the product packages
    python scripts/check_shape.py tasks cli  # some of them

Prints one line per module or function over its limit and exits 1 if there is any; run by scripts/test.sh
before the tests. A function's length counts from its ``def`` (decorators excluded) to its last line,
docstring and comments included, as a reader sees it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("deeprnn", "tracking", "ops", "tasks", "flows", "cli")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
ROOT = Path(__file__).resolve().parent.parent


def oversized(path: Path) -> list[str]:
    """Messages for ``path`` and each of its functions that is over its limit."""
    source = (ROOT / path).read_text(encoding="utf-8")
    problems = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        problems.append(f"{path}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                problems.append(f"{path}:{node.lineno}: {node.name}() is {length} lines (at most {MAX_FUNCTION_LINES})")
    return problems


def main(packages: list[str]) -> int:
    """Check every module of ``packages`` (folders from the project root); 1 if any is over a limit."""
    problems = [
        p
        for package in packages
        for path in sorted((ROOT / package).rglob("*.py"))
        for p in oversized(path.relative_to(ROOT))
    ]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(PACKAGES)))
