#!/usr/bin/env bash
# The test command: installs what it needs, lints, type-checks and runs the whole test suite, then the
# release check (sdist + wheel built, twine check, each extra installed from the wheel in a fresh venv),
# then the suite minus the real-server tests under the other CPythons the classifiers name, each in its
# own venv. Extra arguments go to pytest. Exits non-zero on any failure, including "no tests ran".
#
#   bash scripts/test.sh                                   # CI: everything (3.11 full + 3.12/3.13)
#   PYTHON=python3.12 VENV=.venv-3.12 bash scripts/test.sh tests/gc   # one interpreter, its own venv
#
# With PYTHON or VENV given only that interpreter runs. EXTRA_PYTHONS (space-separated) lists the
# other interpreters (default: python3.12 and python3.13 from PATH or pyenv); set it to "" to skip
# them. A missing interpreter is reported and fails the script.
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

# --- release check (issue 15): build sdist + wheel, twine check, install each extra in a fresh venv ---
VENV=$VENV bash scripts/check_dist.sh
# --- end release check ---

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
    # --- every CPython the classifiers name (issue 15): the suite without the real-server tests ---
    # (gunicorn/uvicorn + wrk runs, 4 of the 6 minutes of the 3.11 run; they drive the same code).
    echo "test.sh: the suite except -m server on CPython $version (.venv-$version)"
    PYTHON=$py VENV=.venv-$version bash scripts/bootstrap.sh
    ".venv-$version/bin/python" -m pytest -q -p no:cacheprovider -m "not server"
    # --- end every CPython ---
done
