#!/usr/bin/env bash
# Release check: builds the sdist and the wheel (the wheel from the sdist, as `python -m build` does),
# runs `twine check --strict`, checks what the sdist ships, then installs the built wheel with each extra
# into a fresh virtualenv and imports what that extra enables. Uses pip's cache and constraints-dev.txt,
# so it takes a minute or two. VENV=... is the development venv (default .venv) with the `release` group.
#
#   bash scripts/check_dist.sh            # called by scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=$VENV/bin/python
work=$(mktemp -d "${TMPDIR:-/tmp}/kotoba-dist.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "check_dist: building sdist and wheel"
"$PY" -m build --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$PY" -m twine check --strict "$work"/dist/*
"$PY" tools/check_dist.py contents "$work"/dist/*.tar.gz "$work"/dist/*.whl
echo "check_dist: built and checked in ${SECONDS}s"

wheel=$(ls "$work"/dist/*.whl)
# One download of every dependency (pip's cache makes it quick), then each fresh venv installs offline
# from that wheelhouse with the development venv's pip (`--python`), so no venv needs pip of its own.
"$PY" -m pip download -q -c constraints-dev.txt -d "$work/wheels" "$wheel[all]" >"$work/download.log" 2>&1 \
    || { cat "$work/download.log"; exit 1; }
echo "check_dist: dependencies downloaded at ${SECONDS}s"
EXTRAS=(core django flask sqlalchemy otel redis compression hooks all)
install_one() {  # $1: extra ("core" for none)
    local extra=$1 venv=$work/venv-$1 spec=$wheel
    [[ $extra != core ]] && spec="$wheel[$extra]"
    python_=$("$PY" -c 'import sys; print(sys._base_executable)')
    "$python_" -m venv --without-pip "$venv"
    if ! "$PY" -m pip --python "$venv/bin/python" install -q --no-compile --no-index --find-links "$work/wheels" "$spec" \
            >"$venv.log" 2>&1; then
        echo "check_dist: [$extra] pip install failed:"; cat "$venv.log"; return 1
    fi
    if ! "$PY" -m pip --python "$venv/bin/python" check >>"$venv.log" 2>&1; then
        echo "check_dist: [$extra] pip check failed:"; cat "$venv.log"; return 1
    fi
    # From the work directory: the repository's sources must not shadow the installed wheel.
    (cd "$work" && "$venv/bin/python" "$repo/tools/check_dist.py" imports "$extra") \
        || { echo "check_dist: [$extra] import check failed"; return 1; }
    echo "check_dist: [$extra] installed and imported"
}
export -f install_one
export work wheel PY
repo=$(pwd) && export repo
# Two at a time (two cores); xargs exits non-zero when any of them failed.
printf '%s\n' "${EXTRAS[@]}" | xargs -P 2 -I{} bash -c 'install_one {}'
echo "check_dist: ok in ${SECONDS}s"
