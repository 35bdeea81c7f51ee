# Device run 10 (nvidia-h200-x4): correctness first. In parallel on separate GPUs: the GPU engine test
# (float32-anchored parity, GPU 0), every kernel-vs-twin test (GPU 1), and the NCCL layouts (TP2, EP2,
# TP2+EP2, EP4, DEP2, Triton + CUDA graphs under TP2/EP2) on all four. Writes /tmp/graphs_ok when the
# NCCL graph test passed, for the benchmark runs of the same lease.
source scripts/device_setup.sh
source scripts/bench_lib.sh
nvidia-smi topo -m | head -8
P="python3 -m pytest -q -p no:cacheprovider -rfE"
log "tests"
CUDA_VISIBLE_DEVICES=0 timeout 420 $P -s tests/gpu/test_engine_gpu.py > $R/engine_gpu.log 2>&1 & E=$!
CUDA_VISIBLE_DEVICES=1 timeout 420 $P tests/gpu --ignore=tests/gpu/test_engine_gpu.py --ignore=tests/gpu/test_parallel_gpu.py > $R/kernels_gpu.log 2>&1 & K=$!
timeout 420 $P -s tests/gpu/test_parallel_gpu.py > $R/parallel_gpu.log 2>&1; echo "parallel rc $?"
wait $E; echo "engine rc $?"; wait $K; echo "kernels rc $?"
grep -q "test_triton_kernels_under_tp2_ep2_are_within_bf16 PASSED\|passed" $R/parallel_gpu.log && ! grep -q "FAILED.*tp2_ep2_are_within" $R/parallel_gpu.log && touch /tmp/graphs_ok
ls /tmp/graphs_ok 2>/dev/null
for f in engine_gpu parallel_gpu kernels_gpu; do echo "--- $f"; grep -E "GPU path|PyTorch path|same greedy|passed|failed|FAILED|ERROR|Error" $R/$f.log | tail -12; done
pack 10
