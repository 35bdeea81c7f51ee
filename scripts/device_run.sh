#!/usr/bin/env bash
# Every measurement on the lent GPU machine, as named suites of one script:
#
#   bash scripts/device_run.sh SUITE [SUITE ...]
#
# Suites (each logs to $R and prints its figures; everything under $R is packed into $OUT at the end):
#   ceilings           device-to-device copy GB/s and bf16 matmul TFLOP/s of this GPU
#   engine-test        tests/gpu/test_engine_gpu.py (the GPU path against the float32-anchored PyTorch path)
#   kernel-tests       every Triton kernel against its PyTorch twin (tests/gpu but the engine and multi-GPU
#                      files, or KERNEL_TEST_FILES; a process per file so that Triton compiles on all cores)
#   kernel-profile     per-kernel-family share of decode steps (batch 1 / 64 / 512) and a 16k prefill step
#                      (MODELS, default 20b,120b), achieved GB/s and TFLOP/s against the measured ceilings; with
#                      BASE set to a second checkout (e.g. .old), the same for its kernels and old against new
#   kernel-sweep       the MoE micro-benchmark (--quick): tuned configs -> $R/sweep/best_configs.json
#   structured         grammar mask time on this host; a server (MODEL) with 64 plain chat streams, then 64
#                      json_schema streams (P10: within 15%), and every structured request kind checked valid
#                      (needs llguidance and jsonschema with its needs in .whl)
#   kv-transfer        disaggregated serving on this GPU: KV over NIXL against ZeroMQ against aggregated serving
#                      (scripts/gpu_kv_transfer.sh, its PARTS / INPUT_LEN / CONCURRENCY / PROMPTS variables;
#                      needs the slimmed nixl-cu13 wheel in .whl)
#   serve:NAME         `osserve serve` + `osserve bench serve` workloads, configured by the variables below
#
# serve:NAME reads, with defaults: MODEL (random:gpt-oss-20b), SERVE_ARGS (extra `osserve serve` flags),
# ROOT (the checkout to serve from: `.` or a second checkout carried beside it, e.g. `.old` for a before/after
# in one lease), WORKLOADS (space-separated CONC:PROMPTS:IN:OUT, e.g. "1:4:1024:256 512:512:1000:1000"),
# PYSPY (seconds of py-spy on the engine process during the last workload, from PYSPY_DELAY seconds into it,
# default 25; 0: none). MODEL_NAME, SERVE_ARGS_NAME, ROOT_NAME, WORKLOADS_NAME, PYSPY_NAME, PYSPY_DELAY_NAME
# (NAME with anything but letters, digits and _ as _) override them for one suite.
# Example: WORKLOADS="512:512:1000:1000" ROOT_old=.old bash scripts/device_run.sh ceilings serve:new serve:old
set -uo pipefail
source scripts/device_setup.sh
R=${R:-/tmp/results}
OUT=${OUT:-/tmp/osserve-out}
mkdir -p "$R" "$OUT"
log() { echo "=== $* ($(date +%T))"; }

suite_ceilings() {
  python3 - <<'PY'
import torch, time
x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter(); n = 20
for _ in range(n): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
print(f"ceiling copy: {2 * x.numel() / dt / 1e9:.0f} GB/s (read + write)")
a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda"); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter(); n = 10
for _ in range(n): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / n
print(f"ceiling bf16 matmul: {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
}

suite_engine-test() {
  timeout ${ENGINE_TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rfE -s tests/gpu/test_engine_gpu.py > "$R/engine_gpu.log" 2>&1
  echo "engine test rc $?"; grep -E "GPU path|PyTorch path|same greedy|passed|failed|FAILED|Error" "$R/engine_gpu.log" | tail -8
}

suite_kernel-tests() {
  local f pids=()
  for f in ${KERNEL_TEST_FILES:-tests/gpu/test_*.py}; do
    case "$f" in *test_engine_gpu.py|*test_parallel_gpu.py) continue ;; esac
    timeout "${KERNEL_TEST_TIMEOUT:-240}" python3 -m pytest "$f" -q -p no:cacheprovider -rfE \
      > "$R/$(basename "$f" .py).log" 2>&1 &
    pids+=($!)
  done
  for f in "${pids[@]}"; do wait "$f"; done
  for f in "$R"/test_*.log; do echo "$(basename "$f" .log): $(tail -1 "$f")"; done
  grep -h -E "^(FAILED|ERROR)" "$R"/test_*.log | head -20
}

suite_kernel-profile() {
  timeout "${PROFILE_TIMEOUT:-240}" python3 -m osserve bench kernels --only profile --models "${MODELS:-20b,120b}" \
    --out "$R/profile-new" > "$R/profile-new.log" 2>&1
  echo "profile rc $?"; grep -v "^USDT" "$R/profile-new.log" | tail -120
  [ -n "${BASE:-}" ] && [ -d "$BASE/osserve" ] || return 0
  cp osserve/bench/kernel_profile.py /tmp/kernel_profile.py
  ( cd "$BASE" && PYTHONPATH=/tmp/site:$PWD timeout "${PROFILE_TIMEOUT:-240}" python3 /tmp/kernel_profile.py \
      --models "${MODELS:-20b,120b}" --out "$R/profile-base" > "$R/profile-base.log" 2>&1 )
  [ -f "$R/profile-base/profile.json" ] && [ -f "$R/profile-new/profile.json" ] && \
    python3 /tmp/kernel_profile.py --compare "$R/profile-base/profile.json" "$R/profile-new/profile.json" \
    | tee "$R/compare.txt"
}

suite_kernel-sweep() {
  timeout "${SWEEP_TIMEOUT:-400}" python3 -m osserve bench kernels --quick --only moe --budget-s 200 \
    --out "$R/sweep" > "$R/sweep.log" 2>&1
  echo "sweep rc $?"; grep -E "^(moe|mxfp4)|ceilings|done in" "$R/sweep.log" | tail -80
}

suite_structured() {
  timeout 120 python3 scripts/grammar_bench.py --libs llguidance --steps 300 2>&1 | tail -8
  local name=structured extra
  SITE=${PYTHONPATH%%:*}
  serve_start "$name" || { kill $SERVER 2>/dev/null; return 1; }
  local B="python3 -m osserve bench serve --base-url http://127.0.0.1:8000 --endpoint chat --disable-tqdm \
    --num-warmups 1 --random-input-len 1000 --random-output-len 1000 --max-concurrency 64 --num-prompts 128 \
    --save-result --result-dir $R"
  timeout 240 $B --result-filename plain-64.json > "$R/bench-plain-64.log" 2>&1
  echo "--- 64 plain chat streams"; grep -E "Output token throughput|Mean TPOT" "$R/bench-plain-64.log"
  extra=$(python3 scripts/structured_check.py --print-extra-body)
  timeout 240 $B --no-ignore-eos --extra-body "$extra" --result-filename json-64.json > "$R/bench-json-64.log" 2>&1
  echo "--- 64 json_schema streams"; grep -E "Output token throughput|Mean TPOT" "$R/bench-json-64.log"
  timeout 240 python3 scripts/structured_check.py --max-tokens 400 2>&1 | tail -12
  grep -E "engine:" "$R/server-$name.log" | tail -3
  kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
}

opt() {  # opt NAME VAR DEFAULT: $VAR_NAME, else $VAR, else DEFAULT
  local key="$2_${1//[^A-Za-z0-9_]/_}"
  if [ -n "${!key:-}" ]; then echo "${!key}"; elif [ -n "${!2:-}" ]; then echo "${!2}"; else echo "$3"; fi
}

serve_start() {  # serve_start NAME: osserve serve from its ROOT on port 8000
  local root model args
  root=$(opt "$1" ROOT .); model=$(opt "$1" MODEL random:gpt-oss-20b); args=$(opt "$1" SERVE_ARGS "")
  ( cd "$root" && PYTHONPATH=${SITE:+$SITE:}$PWD exec python3 -m osserve serve --port 8000 --model "$model" $args ) \
    > "$R/server-$1.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 400); do
    curl -sf http://127.0.0.1:8000/health > /dev/null && return 0
    kill -0 $SERVER 2>/dev/null || break; sleep 1
  done
  echo "server $1 did not become ready"; tail -30 "$R/server-$1.log"; return 1
}

suite_serve() {  # suite_serve NAME
  local name=$1 w conc n in out spy=""
  SITE=${PYTHONPATH%%:*}
  serve_start "$name" || { kill $SERVER 2>/dev/null; return 1; }
  grep -E "KV cache|captured" "$R/server-$name.log" | tail -2
  local workloads pyspy; workloads=$(opt "$name" WORKLOADS 512:512:1000:1000); pyspy=$(opt "$name" PYSPY 0)
  local last=${workloads##* }
  for w in $workloads; do
    IFS=: read conc n in out <<< "$w"
    if [ "$w" = "$last" ] && [ "$pyspy" != 0 ]; then
      ( sleep "$(opt "$name" PYSPY_DELAY 25)"; engine=$(grep -o "engine process started (pid [0-9]*" "$R/server-$name.log" | grep -o "[0-9]*$")
        timeout $((pyspy + 15)) /tmp/site/bin/py-spy record --pid "${engine:-$SERVER}" --duration "$pyspy" --rate 200 \
              --nonblocking --format raw --output "$R/pyspy-$name.txt" > "$R/pyspy-$name.log" 2>&1 ) &
      spy=$!
    fi
    timeout 300 python3 -m osserve bench serve --base-url http://127.0.0.1:8000 --endpoint completions --disable-tqdm \
      --num-warmups 1 --random-input-len "$in" --random-output-len "$out" --max-concurrency "$conc" --num-prompts "$n" \
      --save-result --result-dir "$R" --result-filename "$name-c$conc-$in-$out.json" > "$R/bench-$name-c$conc.log" 2>&1
    echo "--- $name concurrency $conc ($n x $in/$out), rc $?"
    grep -E "Output token throughput|Mean TTFT|Mean TPOT|per user" "$R/bench-$name-c$conc.log" | head -5
  done
  [ -n "$spy" ] && wait "$spy"
  grep -E "engine:" "$R/server-$name.log" | tail -4
  kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
  [ -f "$R/pyspy-$name.txt" ] && python3 scripts/pyspy_top.py "$R/pyspy-$name.txt" | head -25
}

suite_kv-transfer() {
  OUT=$R LABEL=${LABEL:-kv} bash scripts/gpu_kv_transfer.sh 2>&1 | tail -60
}

for s in "$@"; do
  log "$s"
  case "$s" in
    serve:*) suite_serve "${s#serve:}" ;;
    *) "suite_$s" ;;
  esac
  # After every suite, so that a command stopped at its time limit still returns what it measured.
  tar czf "$OUT/results.tgz" -C "$R" .
done
echo "packed $(ls "$R" | wc -l) files into $OUT/results.tgz"
