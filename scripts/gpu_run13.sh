# Device run 13 (nvidia-h200-x4): gpt-oss-120b DEP4 (batch 1 and max throughput), then TP4/EP4 batch 1 (run
# 11's ran past its limit). Eager: CUDA graphs are off under TP/EP/DP.
source scripts/device_setup.sh
source scripts/bench_lib.sh
common="--model random:gpt-oss-120b --max-batch-size 512 --max-num-tokens 16384 --max-seq-len 4096 --engine-process true --tensor-parallel-size 4 --moe-expert-parallel-size 4"
B1="timeout 100 $B --num-warmups 0 --random-input-len 1024 --random-output-len 128 --max-concurrency 1 --num-prompts 2"
log "120b dep4"
serve 120b-dep4 $common --enable-attention-dp true && {
  $B1 --result-filename 120b-dep4-b1.json | grep -E "Mean TPOT|Mean TTFT"
  timeout 200 $B --random-input-len 1000 --random-output-len 1000 --num-warmups 1 --max-concurrency 512 --num-prompts 512 --result-filename 120b-dep4-tput.json | grep -E "throughput|Mean TPOT"
  stop; }
grep -E "engine:|KV cache|Error" $R/server-120b-dep4.log | tail -6
log "120b tp4ep4 batch 1"
serve 120b-tp4ep4-b1 $common && { $B1 --result-filename 120b-tp4ep4-b1.json | grep -E "Mean TPOT|Mean TTFT"; stop; }
grep -E "engine:|Error" $R/server-120b-tp4ep4-b1.log | tail -3
summary $R/*.json
pack 13
