#!/usr/bin/env bash
# Installs what the tests and the demo need: Debian packages for the real services and allocators,
# and a virtualenv with kotoba-memory (editable, every extra) and the `dev` dependency group (pyproject.toml:
# test runner, servers, drivers, benchmark peers, linters, build tools; never published). Safe to re-run.
# PYTHON=... picks the interpreter the virtualenv is made from, VENV=... its directory (default .venv),
# e.g. PYTHON=/root/.pyenv/versions/3.12.1/bin/python3.12 VENV=.venv-3.12 bash scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(redis-server postgresql wrk libjemalloc2 libmimalloc2.0 chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
        exit 1
    fi
    echo "bootstrap: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own init scripts may try to start services; our test tooling starts its own.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp=$VENV/.kotoba-installed
# The C sources are in the stamp too: an editable install compiles them once, so a change must rebuild.
want=$(shopt -s nullglob; cat pyproject.toml constraints-dev.txt setup.py csrc/*.c csrc/*.h | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "bootstrap: installing kotoba-memory[all] and the dev group into $VENV"
    # --group (PEP 735 dependency groups) needs pip >= 25.1.
    "$VENV/bin/python" -m pip install -q --upgrade "pip>=25.1"
    "$VENV/bin/python" -m pip install -q -c constraints-dev.txt -e ".[all]" --group dev
    echo "$want" > "$stamp"
fi
