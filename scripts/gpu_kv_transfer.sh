# KV transfer for disaggregated serving on one GPU (issue #19): a prefill and a decode worker sharing GPU 0,
# the KV moved by NIXL (device to device through UCX's CUDA IPC transport, both pools registered as VRAM)
# against ZeroMQ (device -> host -> ZeroMQ -> host -> device), and both against aggregated serving: TTFT and
# TPOT from `osserve bench serve`, GiB/s of the transfers from the frontend's /metrics
# (scripts/kv_transfer_rate.py), UCX's protocol choices for the NIXL READs (UCX_PROTO_INFO) as the proof that
# no host memory is on the path, and the GPU test of the transport (tests/test_disagg_nixl_gpu.py).
#
# Needs the nixl-cu13 wheel for Python 3.12 in .whl/ beside the other carried wheels (device_setup.sh installs
# them), slimmed by scripts/slim_wheel.py to ~28 MiB so that all fit in one call. Parameters, from the
# environment:
#   PARTS        what to run, any of: check test agg zmq nixl      (default: all of them)
#   MODEL        model of every server                              (random:gpt-oss-20b)
#   INPUT_LEN    prompt tokens; several, space-separated, run in turn   (1024 8192)
#   OUTPUT_LEN   output tokens                                       (128)
#   CONCURRENCY  bench --max-concurrency list                        (1,4,16)
#   PROMPTS      prompts per concurrency                             (8)
#   KV_BLOCKS    kv_cache_config.max_blocks of each engine           (20000)
#   LABEL        names the results                                   (the commit)
# Results: $OUT/kv-transfer-$LABEL.txt (the summary) and $OUT/kv-transfer-$LABEL.tgz (bench JSON, server logs,
# /metrics figures). Each server start draws the model's random weights (about a minute for gpt-oss-20b), so
# split PARTS over calls of 10 minutes, with a LABEL each, e.g. PARTS="check test nixl" LABEL=nixl, then
# PARTS="zmq agg" LABEL=zmq-agg.
#   bash scripts/gpu_kv_transfer.sh                       # everything, defaults
#   PARTS="nixl zmq" INPUT_LEN=8192 bash scripts/gpu_kv_transfer.sh
set -u
source scripts/device_setup.sh
PARTS=${PARTS:-check test agg zmq nixl}
MODEL=${MODEL:-random:gpt-oss-20b}
INPUT_LEN=${INPUT_LEN:-1024 8192}
OUTPUT_LEN=${OUTPUT_LEN:-128}
CONCURRENCY=${CONCURRENCY:-1,4,16}
PROMPTS=${PROMPTS:-8}
KV_BLOCKS=${KV_BLOCKS:-20000}
LABEL=${LABEL:-$(cat .device_commit 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo run)}
R=/tmp/kv-transfer-$LABEL
source scripts/bench_lib.sh
OUT=${OUT:-results}; mkdir -p $OUT
SUM=$OUT/kv-transfer-$LABEL.txt
MAXLEN=$(( $(echo $INPUT_LEN | tr ' ' '\n' | sort -n | tail -1) + OUTPUT_LEN + 64 ))
DEVICES=$(command -v nvidia-smi > /dev/null && echo "[0]" || echo "null")
URL=http://127.0.0.1:8000
# NIXL's bundled UCX loads its CUDA modules with libcudart.so.13 as a dependency: make the copy that torch
# uses findable (torch loads it first in the workers too; this covers the probe below).
CUDART=$(python3 - <<'PY'
import glob, os, sys
for d in sys.path:
    hits = glob.glob(os.path.join(d, "nvidia", "**", "libcudart.so.13*"), recursive=True)
    if hits:
        print(os.path.dirname(hits[0])); break
PY
)
[ -n "$CUDART" ] && export LD_LIBRARY_PATH=$CUDART:${LD_LIBRARY_PATH:-}
{ echo "kv transfer $LABEL: $MODEL, in $INPUT_LEN / out $OUTPUT_LEN, concurrency $CONCURRENCY x $PROMPTS"; } | tee $SUM

has() { [[ " $PARTS " == *" $1 "* ]]; }
bench() {  # bench NAME INPUT_LEN
  timeout 240 $B --model bench --random-input-len $2 --random-output-len $OUTPUT_LEN --max-concurrency $CONCURRENCY \
    --num-prompts-per-concurrency $PROMPTS --ready-check-timeout-sec 300 --label $1-in$2 \
    --result-filename $1-in$2.json | grep -E "^(=|Mean TTFT|Median TTFT|Mean TPOT|Output token)"
}
deploy() {  # deploy TRANSPORT: the disaggregated deployment's file
  cat > $R/pd-$1.yaml <<YAML
model: $MODEL
served_model_name: bench
max_seq_len: $MAXLEN
kv_cache_config: {max_blocks: $KV_BLOCKS}
frontend: {port: 8000, router_mode: kv}
workers:
  - {role: prefill, devices: $DEVICES, kv_transport: $1}
  - {role: decode, devices: $DEVICES, kv_transport: $1}
YAML
  echo $R/pd-$1.yaml
}

if has check; then
  log "NIXL on this machine" | tee -a $SUM
  python3 - <<'PY' 2>&1 | tee -a $SUM
import torch
from osserve.disagg.kv_nixl import import_nixl
nixl = import_nixl()
assert nixl is not None, "NIXL not installed: carry the nixl-cu13 wheel in .whl/"
agent = nixl.nixl_agent("probe", nixl.nixl_agent_config(backends=["UCX"]))
print(nixl.__name__, "UCX memory types:", agent.get_backend_mem_types("UCX"), "| cuda:", torch.cuda.is_available())
PY
fi

if has test; then
  log "GPU test: NIXL between two GPU workers" | tee -a $SUM
  timeout 300 python3 -m pytest tests/test_disagg_nixl_gpu.py -p no:cacheprovider -x -q -rf -p no:timeout 2>&1 \
    | tail -15 | tee -a $SUM
fi

for IN in $INPUT_LEN; do
  if has agg; then
    log "aggregated, in $IN" | tee -a $SUM
    serve agg-in$IN --model $MODEL --served-model-name bench --max-seq-len $MAXLEN \
      --kv-cache-config.max-blocks $KV_BLOCKS && { bench agg $IN | tee -a $SUM; stop; }
  fi
  for T in zmq nixl; do
    has $T || continue
    log "disaggregated, KV over $T, in $IN" | tee -a $SUM
    # UCX prints the protocol it picks for each new kind of transfer (e.g. a READ of device memory from
    # another process on the same GPU: cuda_ipc), once per process.
    UCX_PROTO_INFO=y serve pd-$T-in$IN --config $(deploy $T) || continue
    python3 scripts/kv_transfer_rate.py $URL --save $R/kv-before-$T-in$IN.json > /dev/null
    bench pd-$T $IN | tee -a $SUM
    python3 scripts/kv_transfer_rate.py $URL --since $R/kv-before-$T-in$IN.json \
      --json $R/kv-rate-$T-in$IN.json | tee -a $SUM
    stop
    if [ $T = nixl ]; then
      # Expected on a GPU: "remote memory read by ucp_get*(multi) into cuda memory from cuda" served by
      # cuda_ipc (on CPU: host memory, cma).
      echo "UCX's protocols for the READs (no host staging: device memory both ends, cuda_ipc):" | tee -a $SUM
      grep -A6 "remote memory read" $R/server-pd-$T-in$IN.log | grep -E "remote memory read|[0-9]\.\.(inf|[0-9])" \
        | sed 's/^\[[^]]*\] \[[^]]*\] *//' | sort | uniq -c | sort -rn | head -12 | tee -a $SUM
    fi
    grep -E "NIXL agent|KV fetch .* failed" $R/server-pd-$T-in$IN.log | sort | uniq -c | sort -rn | head -6 | tee -a $SUM
  done
done

log "summary" | tee -a $SUM
summary $R/agg-*.json $R/pd-*.json 2>/dev/null | tee -a $SUM
tar czf $OUT/kv-transfer-$LABEL.tgz -C $R . && echo "packed $(ls $R | wc -l) files into $OUT/kv-transfer-$LABEL.tgz"
