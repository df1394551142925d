#!/usr/bin/env bash
# The test command: installs what it needs, lints, type-checks and runs the whole test suite (on the
# compiled C extensions), then the suite again on the pure-Python implementation, then the GC tests and
# the GC benchmark's smoke test under the other CPythons it supports, each in its own venv.
# Extra arguments go to pytest. Exits non-zero on any failure, including "no tests ran".
#
#   bash scripts/test.sh                                   # CI: everything (3.11 + gc on 3.12/3.13)
#   PYTHON=python3.12 VENV=.venv-3.12 bash scripts/test.sh tests/gc   # one interpreter, its own venv
#
# KOTOBA_MEMORY_SECOND_PASS=0 skips the pure-Python pass. With PYTHON or VENV given only that
# interpreter runs. EXTRA_PYTHONS (space-separated) lists the
# interpreters for the GC runs (default: python3.12 and python3.13 from PATH or pyenv); set it to ""
# to skip them. A missing interpreter is reported and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

single=0
[[ -n ${PYTHON:-} || -n ${VENV:-} ]] && single=1
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3} VENV=$VENV bash scripts/bootstrap.sh
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
# Second pass, KOTOBA_MEMORY_PURE_PYTHON=1: every component on its pure-Python reference (the compiled
# core's differential and fuzz tests skip themselves here; they already compared both in the first
# pass). To keep CI under ~13 minutes on 2 cores it leaves out the tests marked `server` (real
# gunicorn/uvicorn runs and the field suite: the servers' own cost, not ours, dominates them) and
# `slow`; every cache, pool, profiler, GC, optimizer and integration unit test runs both ways.
if [[ ${KOTOBA_MEMORY_SECOND_PASS:-1} != 0 ]]; then
    echo "test.sh: the suite again on the pure-Python implementation (KOTOBA_MEMORY_PURE_PYTHON=1)"
    KOTOBA_MEMORY_PURE_PYTHON=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        -m "not server and not slow" "$@"
fi
((single)) && exit 0

find_python() {  # python3.X on PATH (if it runs: pyenv shims may not), else the newest pyenv build
    local found
    found=$(command -v "python$1" 2>/dev/null) && "$found" -c "" 2>/dev/null && echo "$found" && return
    found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/"python$1" 2>/dev/null | sort -V | tail -n 1)
    [[ -n $found ]] && echo "$found"
}
if [[ -z ${EXTRA_PYTHONS+set} ]]; then
    EXTRA_PYTHONS=""
    for minor in 3.12 3.13; do
        py=$(find_python "$minor") || true
        if [[ -z $py ]]; then
            echo "test.sh: no CPython $minor found (PATH or pyenv); install it or set EXTRA_PYTHONS=\"\"" >&2
            exit 1
        fi
        EXTRA_PYTHONS+=" $py"
    done
fi
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
