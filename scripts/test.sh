#!/usr/bin/env bash
# The test command: installs what it needs, lints, type-checks and runs the whole test suite.
# Extra arguments go to pytest. Exits non-zero on any failure, including "no tests ran".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
