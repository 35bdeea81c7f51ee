# Device run 7: the engine loop in its own process (`--engine-process`) against the in-process server, at
# gpt-oss-20b's max throughput (same run, same configs); then every target row with the engine process:
# 20b batch 1, 20b TTFT of 8,000 tokens, 120b batch 1 and 120b max throughput. py-spy profiles both
# processes during the 20b engine-process throughput run.
source scripts/device_setup.sh
source scripts/bench_lib.sh
T="--random-input-len 1000 --random-output-len 1000 --num-warmups 1"
log "20b, engine in the server process"
serve 20b-inproc --model random:gpt-oss-20b --max-batch-size 512 --max-num-tokens 8192 --max-seq-len 9216 || { pack 7; exit 1; }
timeout 110 $B $T --max-concurrency 512 --num-prompts 512 --result-filename 20b-tput-inproc.json | grep -E "throughput|Mean TPOT"
stop
log "20b, engine process"
serve 20b-proc --model random:gpt-oss-20b --max-batch-size 512 --max-num-tokens 8192 --max-seq-len 9216 --engine-process || { pack 7; exit 1; }
timeout 40 $B --random-input-len 1024 --random-output-len 256 --max-concurrency 1 --num-prompts 4 --result-filename 20b-b1.json | grep -E "Mean TPOT|Mean TTFT"
timeout 30 $B --random-input-len 8000 --random-output-len 2 --max-concurrency 1 --num-prompts 4 --result-filename 20b-ttft8k.json | grep -E "Mean TTFT"
( sleep 40; pyspy $SERVER 12 20b-proc ) & SPY=$!
timeout 110 $B $T --max-concurrency 512 --num-prompts 512 --result-filename 20b-tput-proc.json | grep -E "throughput|Mean TPOT"
wait $SPY; stop
grep "engine:" $R/server-20b-*.log | tail -8
log "120b, engine process"
serve 120b-proc --model random:gpt-oss-120b --max-batch-size 256 --max-num-tokens 8192 --max-seq-len 4096 --engine-process || { pack 7; exit 1; }
timeout 40 $B --random-input-len 1024 --random-output-len 256 --max-concurrency 1 --num-prompts 4 --result-filename 120b-b1.json | grep -E "Mean TPOT|Mean TTFT"
timeout 130 $B $T --max-concurrency 256 --num-prompts 256 --result-filename 120b-tput.json | grep -E "throughput|Mean TPOT"
stop
grep "engine:\|KV cache" $R/server-120b-proc.log | tail -4
summary $R/*.json
pack 7
