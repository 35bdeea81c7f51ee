# Device run 9 (rerun it first next session: its last two parts did not finish in time): where the GPU
# engine's logprob outliers come from (scripts/gpu_diag_engine.py, the PyTorch-only variant first), and the
# CUDA IPC KV transfer test with its output shown, under a hard time limit.
source scripts/device_setup.sh
python3 -m osserve.model.make_checkpoint --preset tiny --out /tmp/tiny > /dev/null 2>&1
timeout 300 python3 scripts/gpu_diag_engine.py /tmp/tiny 2>&1 | grep -v Warning
timeout 120 python3 -m pytest tests/test_disagg_gpu.py -p no:cacheprovider -x -q -s -rf -o log_cli=true --log-cli-level=INFO -p no:timeout 2>&1 | tail -40
