#!/usr/bin/env bash
# The test command: installs what it needs, lints, type-checks and runs the whole test suite on this
# interpreter, the suite minus the real-server tests under the other CPythons the classifiers name (each
# in its own venv; the first of those on the pure-Python implementation, KOTOBA_MEMORY_PURE_PYTHON=1, so
# the suite runs both ways) and the release check, in three phases that keep the CI machine's two cores
# busy (see below). Extra arguments go to this interpreter's runs. Exits non-zero on any failure,
# including "no tests ran" (unless extra arguments left a part without tests).
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
# The other CPythons' venvs are made in the background, one after the other: their editable installs
# build in this tree, which must not happen while the release check builds here too (it starts only
# once they are all made).
versions=() pythons=()
for py in $EXTRA_PYTHONS; do
    if ! command -v "$py" >/dev/null 2>&1; then
        echo "test.sh: interpreter $py not found" >&2
        exit 1
    fi
    versions+=("$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')")
    pythons+=("$py")
done
logs=$(mktemp -d "${TMPDIR:-/tmp}/kotoba-ci.XXXXXX")
chmod 0755 "$logs"  # the test tooling's PostgreSQL runs as the postgres user inside these directories
boot_pids=() pids=()
for i in "${!pythons[@]}"; do
    (
        while ((i > 0)) && [[ ! -e $logs/boot-$((i - 1)).done ]]; do sleep 0.5; done
        status=0
        PYTHON=${pythons[$i]} VENV=.venv-${versions[$i]} bash scripts/bootstrap.sh || status=$?
        touch "$logs/boot-$i.done"
        exit "$status"
    ) >"$logs/boot-$i.log" 2>&1 &
    boot_pids+=($!)
done
trap 'kill "${boot_pids[@]}" "${pids[@]}" 2>/dev/null || true; rm -rf "$logs"' EXIT
wait_boot() {  # wait_boot I: venv I made, or the script fails with its log
    if ! wait "${boot_pids[$1]}"; then
        echo "test.sh: making .venv-${versions[$1]} failed:" >&2
        cat "$logs/boot-$1.log" >&2
        exit 1
    fi
}

"$VENV/bin/ruff" check .
"$VENV/bin/mypy"

# Three phases on the CI machine's two cores (its budget is 15 minutes for all of them):
#  1. side by side: the suite minus the real-server tests (-m "not server") on this interpreter; the
#     same on the first other CPython, on the pure-Python implementation (KOTOBA_MEMORY_PURE_PYTHON=1,
#     issue 12: every test but the real-server ones runs both ways; the compiled core's differential
#     and fuzz tests skip themselves there); and, once the venvs are made, the release check (issue
#     15: sdist + wheel built, twine check, each extra installed from the wheel in a fresh venv);
#  2. the real-server tests (gunicorn/uvicorn + wrk) on this interpreter, alone: they time real load;
#  3. the suite minus the real-server tests on every further CPython (issue 15: each one the
#     classifiers name), in two halves side by side.
# Each run side by side gets a temporary directory of its own (servers' data, example databases) and
# a log, printed when the phase is over.
names=() failed=() selected=()
phase_done=0  # jobs before this index were reported
# Extra arguments select tests: a run given them may then exit 5 ("no tests ran"); every other run,
# and every run without them, must run tests.
nargs=$#
status_ok() { (($1 == 0)) || (($1 == 5 && $2 && nargs > 0)); }  # status_ok STATUS GIVEN_THE_ARGUMENTS
run_bg() {  # run_bg LABEL GIVEN_THE_ARGUMENTS CMD...: CMD in the background, with a TMPDIR of its own
    local n=${#pids[@]} label=$1
    selected+=("$2")
    shift 2
    mkdir -p "$logs/tmp-$n"
    TMPDIR=$logs/tmp-$n "$@" >"$logs/$n.log" 2>&1 &
    names+=("$label") pids+=($!)
}
finish_phase() {  # wait for this phase's jobs, print their logs, remember the failures
    local i status
    for ((i = phase_done; i < ${#pids[@]}; i++)); do
        status=0
        wait "${pids[$i]}" || status=$?
        echo "===== test.sh: ${names[$i]} (exit $status) ====="
        cat "$logs/$i.log"
        status_ok "$status" "${selected[$i]}" || failed+=("$i")
    done
    phase_done=${#pids[@]}
}
main_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# 1.
run_bg "the suite except -m server on CPython $main_version" 1 \
    "$VENV/bin/python" -m pytest -p no:cacheprovider --durations=15 -m "not server" "$@"
pure_venv=$VENV pure_version=$main_version rest=()  # no other CPython: the pure-Python run on this venv
if ((${#pythons[@]})); then
    wait_boot 0
    pure_venv=.venv-${versions[0]} pure_version=${versions[0]}
    rest=("${!pythons[@]}")
    rest=("${rest[@]:1}")
fi
run_bg "the suite except -m server on CPython $pure_version, pure Python" 0 \
    env KOTOBA_MEMORY_PURE_PYTHON=1 "$pure_venv/bin/python" -m pytest -q -p no:cacheprovider -m "not server"
for i in "${!pythons[@]}"; do wait_boot "$i"; done
((${#pythons[@]})) && echo "test.sh: venvs ${versions[*]/#/.venv-} ready"
run_bg "release check" 0 env VENV="$VENV" bash scripts/check_dist.sh
finish_phase

# 2.
echo "===== test.sh: the real-server tests (-m server) on CPython $main_version ====="
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider --durations=10 -m server "$@" || status=$?
server_failed=0
status_ok "$status" 1 || server_failed=1

# 3. The two halves of the suite: the directories below, and everything else. Their split keeps the
# halves' times near each other (in CI: cache and profiler 151 s beside the rest's 182 s; with gc and
# pool too, 186 s beside 128 s).
first_half=(tests/cache tests/profiler tests/gc)
ignore_first=()
for dir in "${first_half[@]}"; do ignore_first+=("--ignore=$dir"); done
for i in "${rest[@]}"; do
    py=.venv-${versions[$i]}/bin/python
    run_bg "the suite except -m server on CPython ${versions[$i]}: ${first_half[*]}" 0 \
        "$py" -m pytest -q -p no:cacheprovider -m "not server" "${first_half[@]}"
    run_bg "the suite except -m server on CPython ${versions[$i]}: the rest" 0 \
        "$py" -m pytest -q -p no:cacheprovider -m "not server" "${ignore_first[@]}"
    finish_phase
done

for i in "${failed[@]}"; do  # the failures again, last, where a truncated log still shows them
    echo "===== test.sh: FAILED: ${names[$i]} ====="
    tail -n 40 "$logs/$i.log"
done
((server_failed)) && echo "===== test.sh: FAILED: the real-server tests on CPython $main_version (above) ====="
((${#failed[@]} == 0 && !server_failed))
