# Device run 8: aggregated against disaggregated serving on the one H100 (prefill and decode workers share
# GPU 0, KV over ZeroMQ), gpt-oss-20b, 1024 in / 128 out at concurrency 1, 4, 16; then the GPU engine test.
source scripts/device_setup.sh
source scripts/bench_lib.sh
cat > /tmp/pd.yaml <<'YAML'
model: random:gpt-oss-20b
served_model_name: bench
max_seq_len: 4096
kv_cache_config: {max_blocks: 20000}
frontend: {port: 8000, router_mode: kv}
workers:
  - {role: prefill, devices: [0], kv_transport: zmq}
  - {role: decode, devices: [0], kv_transport: zmq}
YAML
PD="--random-input-len 1024 --random-output-len 128 --max-concurrency 1,4,16 --num-prompts-per-concurrency 8"
log "disaggregated"
python3 -m osserve serve --config /tmp/pd.yaml > $R/server-pd.log 2>&1 & SERVER=$!
for _ in $(seq 180); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
timeout 100 $B $PD --label disaggregated --result-filename pd.json | grep -E "^(=|Max|Mean TTFT|Mean TPOT|Output token)"
stop
log "aggregated"
serve agg --model random:gpt-oss-20b --served-model-name bench --max-seq-len 4096 --kv-cache-config.max-blocks 20000 || { pack 8; exit 1; }
timeout 80 $B $PD --label aggregated --result-filename agg.json | grep -E "^(=|Max|Mean TTFT|Mean TPOT|Output token)"
stop
pack 8
log "GPU engine test"
timeout 100 python3 -m pytest tests/gpu/test_engine_gpu.py -p no:cacheprovider -x -q -rf 2>&1 | grep -E "^E |passed|failed" | head -20
