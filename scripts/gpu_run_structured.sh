# Device run (nvidia-h200): structured outputs (P10) on gpt-oss-20b with random weights, the engine in its own
# process with CUDA graphs (the defaults on CUDA). Needs in .whl: llguidance, and jsonschema with its needs
# (attrs, jsonschema-specifications, referencing, rpds-py) for the validity check; docs/PERFORMANCE.md,
# "Structured outputs", has the pip download command. Prints:
#   - the bitmask kernel against its twin and the GPU engine parity test (pytest summary lines);
#   - the grammar engine's mask time per token on this host's CPUs, batch 1 and 256 (grammar_bench.py);
#   - "N/N valid" per kind of structured request (structured_check.py: 32 schemas streamed and not, n=3,
#     tool_choice required / named, Responses text.format / tool_choice) — every line must be all valid;
#   - output throughput and TPOT of 64 plain chat streams, then of 64 json_schema streams (target: the
#     json_schema throughput within 15% of the plain one).
source scripts/device_setup.sh
source scripts/bench_lib.sh
log "bitmask kernel, engine parity"
timeout 300 python3 -m pytest -q tests/gpu/test_bitmask.py tests/gpu/test_engine_gpu.py 2>&1 | tail -3
log "grammar mask time on this host"
timeout 120 python3 scripts/grammar_bench.py --libs llguidance --steps 300
serve 20b-structured --model random:gpt-oss-20b --max-batch-size 256 --max-seq-len 4096 --engine-process true && {
  log "validity"
  timeout 300 python3 scripts/structured_check.py --max-tokens 400
  C="$B --endpoint chat --random-input-len 1000 --random-output-len 1000 --max-concurrency 64 --num-prompts 128"
  log "64 plain streams"
  timeout 240 $C --result-filename plain-64.json | grep -E "throughput|Mean TPOT"
  log "64 json_schema streams"
  timeout 240 $C --no-ignore-eos --extra-body "$(python3 scripts/structured_check.py --print-extra-body)" \
    --result-filename json-64.json | grep -E "throughput|Mean TPOT"
  stop; }
grep -E "engine:|CUDA graph|Error|Traceback|grammar" $R/server-20b-structured.log | tail -12
summary $R/*.json
pack structured
