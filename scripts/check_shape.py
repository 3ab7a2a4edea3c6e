"""Check the shape of the product code: no module over 400 lines, no function over 60, no two modules of the
same name, and every part of ``deeprnn`` in the import contracts.

    python scripts/check_shape.py                                # the whole package
    python scripts/check_shape.py deeprnn/tasks deeprnn/cli      # the sizes of some folders

Prints one line per problem and exits 1 if there is any; run by scripts/test.sh before the tests. A
function's length counts from its ``def`` (decorators excluded) to its last line, docstring and comments
included, as a reader sees it. The contracts (``[tool.importlinter]`` in pyproject.toml) name the library's
modules one by one; a module of ``deeprnn`` that is in neither the library's contract nor the layers would be
checked by none of them.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections import defaultdict
from pathlib import Path

PACKAGES = ("deeprnn",)
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


def shared_names(package: str = "deeprnn") -> list[str]:
    """Messages for module names that exist in more than one folder of ``package`` (``__init__.py`` aside)."""
    folders: dict[str, list[str]] = defaultdict(list)
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name != "__init__.py":
            folders[path.name].append(str(path.parent.relative_to(ROOT)))
    return [
        f"{name} is in {', '.join(where)}: name one after what it does"
        for name, where in folders.items()
        if len(where) > 1
    ]


def uncontracted(package: str = "deeprnn") -> list[str]:
    """Messages for the parts of ``package`` that no import contract in pyproject.toml names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    named = set()
    for contract in config["contracts"]:
        named.update(contract.get("source_modules", []))
        named.update(contract.get("layers", []))
    parts = {
        f"{package}.{path.stem if path.is_file() else path.name}"
        for path in (ROOT / package).iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py") or (path / "__init__.py").is_file()
    }
    return [f"{part}: in no import contract (pyproject.toml, [tool.importlinter])" for part in sorted(parts - named)]


def main(packages: list[str]) -> int:
    """Check every module of ``packages`` (folders from the project root); 1 if there is any problem."""
    problems = [
        p
        for package in packages
        for path in sorted((ROOT / package).rglob("*.py"))
        for p in oversized(path.relative_to(ROOT))
    ]
    if packages == list(PACKAGES):
        problems += shared_names() + uncontracted()
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(PACKAGES)))
