#!/usr/bin/env bash
# The main job: run the Flask example app under gunicorn with kotoba-memory attached and its leaking
# route switched on, drive it with wrk on 127.0.0.1 across several routes, then ask the app for its
# memory report (through the token-protected report endpoint), print the summary and where the HTML
# report was written, and stop the server. Bounded: about a minute. Options via the environment:
#   DEMO_SECONDS   load duration in seconds (default 25)
#   DEMO_REPORTS   directory for the HTML/JSON reports (default ./reports)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if ! bash scripts/bootstrap.sh; then
    # A usable environment from an earlier bootstrap is enough to run the demo; say so loudly.
    if .venv/bin/python -c 'import kotoba_memory_integrations.flask, gunicorn, httpx' 2>/dev/null \
        && command -v wrk >/dev/null; then
        echo "demo: WARNING: scripts/bootstrap.sh failed; continuing with the existing .venv" >&2
    else
        echo "demo: scripts/bootstrap.sh failed and there is no usable .venv" >&2
        exit 1
    fi
fi

PY=$ROOT/.venv/bin/python
SECONDS_OF_LOAD=${DEMO_SECONDS:-25}
if ! [[ $SECONDS_OF_LOAD =~ ^[0-9]+$ ]] || ((SECONDS_OF_LOAD < 5 || SECONDS_OF_LOAD > 120)); then
    echo "demo: DEMO_SECONDS must be a whole number between 5 and 120" >&2
    exit 2
fi
REPORTS=${DEMO_REPORTS:-$ROOT/reports}
mkdir -p "$REPORTS"
REPORTS=$(cd "$REPORTS" && pwd)

WORK=$(mktemp -d -t kotoba-demo.XXXXXX)
SERVER_PID=""
cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
BASE=http://127.0.0.1:$PORT

echo "demo: starting the Flask example under gunicorn on $BASE (leaking route on)"
(
    cd examples/flask_app
    export KOTOBA_EXAMPLE_BIND=127.0.0.1:$PORT KOTOBA_EXAMPLE_LEAK=1 KOTOBA_EXAMPLE_REPORT_TOKEN=$TOKEN \
        KOTOBA_EXAMPLE_DATA_DIR=$WORK KOTOBA_EXAMPLE_REPORT_DIR=$REPORTS \
        KOTOBA_EXAMPLE_LEAK_WINDOW_INTERVAL_S=3 KOTOBA_EXAMPLE_LEAK_TRACE_BUDGET=none \
        KOTOBA_EXAMPLE_MONITORING_INTERVAL_MS=250
    exec "$ROOT/.venv/bin/gunicorn" -c gunicorn.conf.py 'app:create_app()'
) >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

ready=""
for _ in $(seq 1 150); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        break
    fi
    if "$PY" -c "import httpx, sys; sys.exit(httpx.get('$BASE/', timeout=1).status_code != 200)" 2>/dev/null; then
        ready=1
        break
    fi
    sleep 0.2
done
if [[ -z $ready ]]; then
    echo "demo: the server did not come up; its log:" >&2
    cat "$WORK/server.log" >&2
    exit 1
fi

# wrk picks each request's route at random, as real traffic does (not in a fixed cycle, whose
# per-window route counts would all move in lockstep); /leak is about one request in six.
cat >"$WORK/routes.lua" <<'LUA'
local paths = {"/", "/books", "/books/7", "/stats", "/checksum/2000", "/leak", "/books/42", "/books", "/", "/leak",
               "/checksum/500", "/books/150"}
local counter = 0
function init(args)
    counter = counter + 1
    math.randomseed(os.time() * 1000 + counter)
end
request = function()
    return wrk.format("GET", paths[math.random(#paths)])
end
LUA
echo "demo: wrk -t2 -c4 -d${SECONDS_OF_LOAD}s, random routes among / /books /books/<id> /stats /checksum/<n> /leak"
wrk -t2 -c4 -d"${SECONDS_OF_LOAD}s" --timeout 5s -s "$WORK/routes.lua" "$BASE/" | sed 's/^/  /'

AUTH="Authorization: Bearer $TOKEN"
echo
echo "demo: anonymous request to the report endpoint is refused:"
"$PY" -c "import httpx; r = httpx.get('$BASE/_kotoba/report', timeout=10); print('  HTTP', r.status_code)"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
HTML=$REPORTS/demo-$STAMP.html
JSON=$REPORTS/demo-$STAMP.json
"$PY" - "$BASE" "$TOKEN" "$HTML" "$JSON" <<'PY'
import sys

import httpx

base, token, html_path, json_path = sys.argv[1:]
headers = {"Authorization": f"Bearer {token}"}
with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
    summary = client.get("/_kotoba/report")
    summary.raise_for_status()
    html = client.get("/_kotoba/report", params={"format": "html"})
    html.raise_for_status()
    data = client.get("/_kotoba/report", params={"format": "json"})
    data.raise_for_status()
open(html_path, "w", encoding="utf-8").write(html.text)
open(json_path, "w", encoding="utf-8").write(data.text)
print()
print(summary.text.rstrip())
leaks = data.json().get("leaks") or []
print()
if leaks:
    top = leaks[0]
    print(f"top leak suspect: route {top.get('route')} at {top.get('allocation_site')}")
else:
    print("no leak suspect was reported (a longer DEMO_SECONDS gives the detector more windows)")
PY
echo
echo "HTML report written to $HTML"
echo "JSON report written to $JSON"
