#!/usr/bin/env bash
# The full schemathesis run of docs/RELIABILITY.md: every operation of a live `osserve serve` (the tiny
# random preset, a short context so that generations stay short on a CPU), every check, positive and negative
# cases. Usage: bash scripts/reliability_schemathesis.sh [MAX_EXAMPLES] [PORT]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
PORT=${2:-18120}
PY=${PYTHON:-python}
DIR=$(mktemp -d)
LOG=$DIR/server.log
"$PY" -m osserve make-checkpoint --preset tiny --out "$DIR/tiny" --seed 0 >/dev/null
"$PY" -m osserve serve --model "$DIR/tiny" --port "$PORT" --max-seq-len 256 --log-level warning >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.5
done
"$PY" -m schemathesis.cli run "http://127.0.0.1:$PORT/openapi.json" --checks all --continue-on-failure -n "$N" \
  --max-response-time 600 --request-timeout 600 --seed 0 || true
# Every answer the server gave, by endpoint and status (a 5xx would show here whatever schemathesis says).
curl -s "http://127.0.0.1:$PORT/metrics" | grep '^osserve_requests_total'
echo "server log: $LOG"
