# Shell helpers for the device runs (sourced after device_setup.sh): start / stop a server, run
# `osserve bench serve` against it, print result summaries. Results go to $R (tarred into $OUT at the end).
R=${R:-/tmp/results}; mkdir -p $R
# The kernel sweep's winners: this machine's own (an earlier call of the same lease), else carried ones.
for c in /tmp/kbench/best_configs.json .kbench/best_configs.json; do
  [ -f $c ] && export OSSERVE_TRITON_CONFIGS=$(readlink -f $c) && echo "tuned configs: $c" && break
done
log() { echo "=== $* ($(date +%T))"; }
serve() {  # serve LOGNAME osserve-serve-args... ; sets SERVER
  local name=$1; shift
  python3 -m osserve serve --port 8000 "$@" > $R/server-$name.log 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do curl -sf http://127.0.0.1:8000/health > /dev/null && return 0; sleep 1
    kill -0 $SERVER 2>/dev/null || break; done
  echo "server $name did not become ready"; tail -30 $R/server-$name.log; return 1
}
stop() { kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; }
B="python3 -m osserve bench serve --base-url http://127.0.0.1:8000 --endpoint completions --disable-tqdm --num-warmups 2 --save-result --result-dir $R"
summary() { python3 - "$@" <<'PY'
import json, sys
for f in sys.argv[1:]:
    try:
        s = json.load(open(f))["summary"]
    except Exception as e:  # noqa: BLE001
        print(f, "unreadable:", e); continue
    keys = ["completed", "failed", "duration_s", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_itl_ms", "output_tokens_per_user_per_s"]
    print(f.split("/")[-1], {k: round(s[k], 2) if isinstance(s.get(k), float) else s.get(k) for k in keys})
PY
}
pyspy() {  # pyspy PID SECONDS NAME: sample a server's Python stacks (all threads) without pausing it
  command -v py-spy > /dev/null || [ -x /tmp/site/bin/py-spy ] || { echo "no py-spy"; return; }
  local bin=$(command -v py-spy || echo /tmp/site/bin/py-spy)
  timeout $(( $2 + 20 )) $bin record --pid $1 --duration $2 --rate 200 --nonblocking --threads --subprocesses \
    --format raw --output $R/pyspy-$3.txt > $R/pyspy-$3.log 2>&1 || echo "py-spy failed: $(tail -2 $R/pyspy-$3.log)"
}
pack() { tar czf $OUT/results-$1.tgz -C $R . && echo "packed $(ls $R | wc -l) files"; }
