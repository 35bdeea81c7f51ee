# Device run 12 (nvidia-h200-x4): gpt-oss-120b TP2/EP2 on GPUs 0-1 and, beside it, one H200 alone (TP1) on
# GPU 2 for TensorRT-LLM's per-H200 TP1 anchor; run 11's workloads (TP1: 256 prompts at concurrency 256).
source scripts/device_setup.sh
source scripts/bench_lib.sh
[ -f /tmp/graphs_ok ] || G="--cuda-graph-config.max-batch-size 0"
common="--model random:gpt-oss-120b --max-batch-size 512 --max-num-tokens 16384 --max-seq-len 4096 --engine-process true"
T="--random-input-len 1000 --random-output-len 1000 --num-warmups 1"
CUDA_VISIBLE_DEVICES=2 python3 -m osserve serve --port 8001 $common > $R/server-120b-tp1.log 2>&1 & S1=$!
log "120b tp2ep2"
export CUDA_VISIBLE_DEVICES=0,1
serve 120b-tp2ep2 $common --tensor-parallel-size 2 --moe-expert-parallel-size 2 $G || true
timeout 60 $B --random-input-len 1024 --random-output-len 256 --max-concurrency 1 --num-prompts 4 --result-filename 120b-tp2ep2-b1.json | grep -E "Mean TPOT|Mean TTFT"
timeout 200 $B $T --max-concurrency 512 --num-prompts 512 --result-filename 120b-tp2ep2-tput.json | grep -E "throughput|Mean TPOT"
stop; unset CUDA_VISIBLE_DEVICES
log "120b tp1 (one H200)"
B1="${B/8000/8001}"
for _ in $(seq 120); do curl -sf http://127.0.0.1:8001/health > /dev/null && break; sleep 1; done
timeout 60 $B1 --random-input-len 1024 --random-output-len 256 --max-concurrency 1 --num-prompts 4 --result-filename 120b-tp1-b1.json | grep -E "Mean TPOT|Mean TTFT"
timeout 150 $B1 $T --max-concurrency 256 --num-prompts 256 --result-filename 120b-tp1-tput.json | grep -E "throughput|Mean TPOT"
kill $S1; wait $S1 2>/dev/null
grep -E "engine:|KV cache|captured|Error" $R/server-120b-*.log | tail -8
summary $R/*.json
pack 12
