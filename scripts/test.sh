#!/usr/bin/env bash
# The test command: installs what it needs, lints, type-checks and runs the whole test suite, then, side
# by side, the release check (sdist + wheel built, twine check, each extra installed from the wheel in a
# fresh venv) and the suite minus the real-server tests under the other CPythons the classifiers name,
# each in its own venv; the first of those runs on the pure-Python implementation
# (KOTOBA_MEMORY_PURE_PYTHON=1), so the suite runs both ways. Extra arguments go to the main pytest run.
# Exits non-zero on any failure, including "no tests ran".
#
#   bash scripts/test.sh                                   # CI: everything (3.11 full + 3.12/3.13)
#   PYTHON=python3.12 VENV=.venv-3.12 bash scripts/test.sh tests/gc   # one interpreter, its own venv
#
# With PYTHON or VENV given only that interpreter runs. EXTRA_PYTHONS (space-separated) lists the
# other interpreters (default: python3.12 and python3.13 from PATH or pyenv); set it to "" to skip
# them (the pure-Python pass then runs on the main venv). A missing interpreter is reported and fails
# the script.
set -euo pipefail
cd "$(dirname "$0")/.."

single=0
[[ -n ${PYTHON:-} || -n ${VENV:-} ]] && single=1
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3} VENV=$VENV bash scripts/bootstrap.sh
if ((single)); then
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy"
    exec "$VENV/bin/python" -m pytest "$@"
fi

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
# The other CPythons' venvs are made in the background while the main suite starts, one after the
# other: their editable installs build in this tree, which must not happen while the release check
# builds here too (it starts only after they are done).
versions=() pythons=()
for py in $EXTRA_PYTHONS; do
    if ! command -v "$py" >/dev/null 2>&1; then
        echo "test.sh: interpreter $py not found" >&2
        exit 1
    fi
    versions+=("$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')")
    pythons+=("$py")
done
boot_log=$(mktemp "${TMPDIR:-/tmp}/kotoba-boot.XXXXXX")
(
    for i in "${!pythons[@]}"; do
        PYTHON=${pythons[$i]} VENV=.venv-${versions[$i]} bash scripts/bootstrap.sh || exit 1
    done
) >"$boot_log" 2>&1 &
boot_pid=$!
trap 'kill "$boot_pid" 2>/dev/null || true; rm -f "$boot_log"' EXIT

"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
# The whole suite, real servers included, on this interpreter: its server tests (in tests/integrations,
# well after the venvs above are done) time real load, so nothing else runs beside them.
"$VENV/bin/python" -m pytest --durations=15 "$@"
if ! wait "$boot_pid"; then
    echo "test.sh: making the venvs of ${versions[*]} failed:" >&2
    cat "$boot_log" >&2
    exit 1
fi
echo "test.sh: venvs ${versions[*]/#/.venv-} ready"

# Then side by side (two cores; the CI budget is 15 minutes): the release check (issue 15: sdist +
# wheel built, twine check, each extra installed from the wheel in a fresh venv) and the suite minus
# the real-server tests on every other CPython the classifiers name (issue 15). The first of those runs
# the pure-Python implementation (KOTOBA_MEMORY_PURE_PYTHON=1), the others the compiled extensions, so
# every test but the real-server ones runs both ways (issue 12); the compiled core's differential and
# fuzz tests skip themselves in the pure-Python run. The real-server tests (gunicorn/uvicorn + wrk)
# drive the same code and need the machine to themselves.
logs=$(mktemp -d "${TMPDIR:-/tmp}/kotoba-ci.XXXXXX")
chmod 0755 "$logs"  # the test tooling's PostgreSQL runs as the postgres user inside these directories
names=() pids=()
VENV=$VENV bash scripts/check_dist.sh >"$logs/0.log" 2>&1 &
names+=("release check") pids+=($!)
pure=1
# Each run side by side gets a temporary directory of its own (servers' data, example databases).
own_tmp() { mkdir -p "$logs/tmp-$1" && echo "$logs/tmp-$1"; }
if ((${#versions[@]} == 0)); then  # no other CPython: the pure-Python run on this venv
    TMPDIR=$(own_tmp 1) KOTOBA_MEMORY_PURE_PYTHON=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
        -m "not server" >"$logs/1.log" 2>&1 &
    names+=("the suite except -m server, pure Python") pids+=($!)
fi
for version in "${versions[@]}"; do
    TMPDIR=$(own_tmp ${#pids[@]}) KOTOBA_MEMORY_PURE_PYTHON=$pure ".venv-$version/bin/python" -m pytest \
        -q -p no:cacheprovider -m "not server" >"$logs/${#pids[@]}.log" 2>&1 &
    label="the suite except -m server on CPython $version"
    ((pure)) && label+=", pure Python"
    names+=("$label")
    pids+=($!)
    pure=0
done
failed=()
for i in "${!pids[@]}"; do
    status=0
    wait "${pids[$i]}" || status=$?
    echo "===== test.sh: ${names[$i]} (exit $status) ====="
    cat "$logs/$i.log"
    ((status == 0)) || failed+=("$i")
done
for i in "${failed[@]}"; do  # the failures again, last, where a truncated log still shows them
    echo "===== test.sh: FAILED: ${names[$i]} ====="
    tail -n 40 "$logs/$i.log"
done
rm -rf "$logs"
((${#failed[@]} == 0))
