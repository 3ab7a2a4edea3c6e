#!/usr/bin/env bash
# Install deeprnn and its test tools into ./.venv, then run the whole test suite.
#   bash scripts/test.sh [pytest args...]
#   bash scripts/test.sh -m "not e2e"     the fast lane: the library and unit tests, under two minutes
# TORCH_SPEC picks the torch build (default torch==2.13.0; an already-installed torch is kept). Every install is
# held to the tested versions in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q -c constraints.txt "${TORCH_SPEC:-torch==2.13.0}"
# The rest with uv, which installs and compiles to bytecode in parallel (pip's serial install took minutes);
# pip where uv cannot be had. Bytecode is compiled at install: a process that may not write .pyc files
# (PYTHONDONTWRITEBYTECODE) would otherwise compile mlflow and prefect on every import.
if python -m pip install -q -c constraints.txt uv 2>/dev/null; then
    install=(uv pip install -q --compile-bytecode)
else
    install=(python -m pip install -q)
fi
# postgres: the drivers of the team's stack (tests/e2e/test_team_stack.py runs it on PostgreSQL).
"${install[@]}" -c constraints.txt -e ".[test,postgres]"
# The book's own code, for the fidelity tests. Its pinned 2022 dependencies are not needed (nor installable).
"${install[@]}" --no-deps -c constraints.txt "d2l==0.17.6"

# Hygiene first (seconds): lint and format, strict types of the library, the import contracts (the layers
# cli > flows > tasks > ops > tracking > deeprnn; the library imports neither prefect nor mlflow), and the
# size of modules (400 lines) and functions (60); then the documentation site, where a broken link, a missing
# page or a missing image fails the build (its output goes to ./site, ignored by git). Not --quiet: it also
# silences the warnings that --strict fails on.
# mypy, the longest of them, runs beside the tests, which start once the others passed; its verdict is awaited
# after the tests, and a type error fails the command as a failed test does.
ruff check .
ruff format --check .
lint-imports
python scripts/check_shape.py
NO_MKDOCS_2_WARNING=1 mkdocs build --strict
mypy > .mypy.log 2>&1 &
mypy_pid=$!

tests=0
python -m pytest "$@" || tests=$?
types=0
wait "$mypy_pid" || types=$?
cat .mypy.log
if [ "$types" -ne 0 ]; then
    echo "mypy: the type errors above fail the command" >&2
    exit 1
fi
exit "$tests"
