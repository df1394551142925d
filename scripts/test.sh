#!/usr/bin/env bash
# The test command: installs what it needs, lints, type-checks and runs the whole test suite, then the
# GC tests and the GC benchmark's smoke test under the other CPythons it supports, each in its own venv.
# Extra arguments go to pytest. Exits non-zero on any failure, including "no tests ran".
#
#   bash scripts/test.sh                                   # CI: everything (3.11 + gc on 3.12/3.13)
#   PYTHON=python3.12 VENV=.venv-3.12 bash scripts/test.sh tests/gc   # one interpreter, its own venv
#
# With PYTHON or VENV given only that interpreter runs. EXTRA_PYTHONS (space-separated) lists the
# interpreters for the GC runs; set it to "" to skip them. A missing interpreter is reported and fails.
set -euo pipefail
cd "$(dirname "$0")/.."

single=0
[[ -n ${PYTHON:-} || -n ${VENV:-} ]] && single=1
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3} VENV=$VENV bash scripts/bootstrap.sh
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
((single)) && exit 0

EXTRA_PYTHONS=${EXTRA_PYTHONS-/root/.pyenv/versions/3.12.1/bin/python3.12 /root/.pyenv/versions/3.13.0/bin/python3.13}
for py in $EXTRA_PYTHONS; do
    if ! command -v "$py" >/dev/null 2>&1; then
        echo "test.sh: interpreter $py not found" >&2
        exit 1
    fi
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    echo "test.sh: GC tests and GC benchmark smoke test on CPython $version (.venv-$version)"
    PYTHON=$py VENV=.venv-$version bash scripts/bootstrap.sh
    ".venv-$version/bin/python" -m pytest -q -p no:cacheprovider tests/gc
done
