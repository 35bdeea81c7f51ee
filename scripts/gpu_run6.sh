# Device run 6: every GPU test (kernels vs twins, GPU engine vs reference, CUDA IPC KV transfer), the kernel
# sweep (tuned configs stay in /tmp/kbench for the next warm call), then gpt-oss-20b's targets through HTTP,
# with a py-spy profile of the server during the max-throughput run.
source scripts/device_setup.sh
set -o pipefail
timeout 200 python3 -m pytest tests/gpu tests/test_disagg_gpu.py -q -p no:cacheprovider 2>&1 | tee $OUT/gpu_tests.log | tail -15
mkdir -p /tmp/kbench
timeout 150 python3 -m osserve.bench.kernels --out /tmp/kbench --quick --budget-s 100 2>&1 | tee $OUT/kbench.log | tail -25
source scripts/bench_lib.sh
log "20b server"
serve 20b --model random:gpt-oss-20b --max-batch-size 512 --max-num-tokens 8192 --max-seq-len 9216 || { pack 6; exit 1; }
log "20b batch-1 decode 1024/256"; timeout 40 $B --random-input-len 1024 --random-output-len 256 --max-concurrency 1 --num-prompts 4 --result-filename 20b-b1.json | tail -2
log "20b TTFT 8000"; timeout 30 $B --random-input-len 8000 --random-output-len 2 --max-concurrency 1 --num-prompts 4 --result-filename 20b-ttft8k.json | tail -2
log "20b 1000/1000 c512"
( sleep 45; pyspy $SERVER 15 20b-tput ) & SPY=$!
timeout 140 $B --random-input-len 1000 --random-output-len 1000 --max-concurrency 512 --num-prompts 512 --num-warmups 1 --result-filename 20b-tput.json | tail -2
wait $SPY
stop
summary $R/20b-*.json
grep "engine:" $R/server-20b.log | tail -6
pack 6
