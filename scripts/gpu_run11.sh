# Device runs 11 and 13 (nvidia-h200-x4): gpt-oss-120b (random weights drawn on each rank) over four GPUs,
# through HTTP with the engine in its own process: batch 1 (1024 in / 256 out, 4 prompts) and max
# throughput (1000 in / 1000 out, 512 prompts at concurrency 512). `bash scripts/gpu_run11.sh tp4ep4|dep4`.
source scripts/device_setup.sh
source scripts/bench_lib.sh
L=${1:-tp4ep4}
[ -f /tmp/graphs_ok ] || { G="--cuda-graph-config.max-batch-size 0"; echo "CUDA graphs off (run 10's NCCL graph test did not pass)"; }
extra="--tensor-parallel-size 4 --moe-expert-parallel-size 4"; [ $L = dep4 ] && extra="$extra --enable-attention-dp true"
log "120b $L"
serve 120b-$L --model random:gpt-oss-120b --max-batch-size 512 --max-num-tokens 16384 --max-seq-len 4096 --engine-process true $extra $G || { pack $L; exit 1; }
timeout 100 $B --num-warmups 0 --random-input-len 1024 --random-output-len 128 --max-concurrency 1 --num-prompts 2 --result-filename 120b-$L-b1.json | grep -E "Mean TPOT|Mean TTFT"
timeout 200 $B --random-input-len 1000 --random-output-len 1000 --num-warmups 1 --max-concurrency 512 --num-prompts 512 --result-filename 120b-$L-tput.json | grep -E "throughput|Mean TPOT"
stop
grep -E "engine:|KV cache|captured|CUDA graphs|Error|drew" $R/server-120b-$L.log | tail -8
summary $R/*.json
pack $L
