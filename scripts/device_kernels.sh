# Kernel measurements on one GPU (issue P9), one command, results under $OUT, within a 9-minute limit:
#   tests    the GPU kernel tests (tests/gpu, one process per file so Triton compiles on all cores)
#   profile  ceilings + per-kernel-family share of decode steps (batch 1 / 64 / 512) and a 16k prefill step
#            of gpt-oss-20b and 120b with this tree's kernels        -> $OUT/new/profile.{txt,json}
#   base     the same profile with the kernels of the checkout in .base/ (the old ones), then old vs new
#            -> $OUT/base/profile.{txt,json}, $OUT/compare.txt
#   sweep    the MoE micro-benchmark, --quick: old byte-decode configs beside the new defaults -> $OUT/sweep
# Usage, from the repository root (device_setup.sh installs carried wheels):
#   bash scripts/device_kernels.sh                      # PARTS="tests profile base"
#   PARTS="sweep" bash scripts/device_kernels.sh        # a second call
# .base/ holds the old tree, e.g. `mkdir .base && git archive MERGE_BASE osserve | tar -x -C .base` here,
# carried along (it is untracked, so it travels with the working tree). MODELS=20b,120b by default.
source scripts/device_setup.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODELS=${MODELS:-20b,120b}
PARTS=${PARTS:-tests profile base}
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-510}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
log() { echo "=== $* ($(date +%T), $(left)s left)"; }

for part in $PARTS; do
  case $part in
  tests)
    log "tests/gpu (a process per file)"
    t=$(cap 210)
    pids=()
    for f in tests/gpu/test_*.py; do
      name=$(basename "$f" .py)
      timeout "$t" python3 -m pytest "$f" -x -q -p no:cacheprovider > "$OUT/$name.log" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    for f in "$OUT"/test_*.log; do echo "$(basename "$f" .log): $(tail -1 "$f")"; done | tee "$OUT/tests.txt"
    grep -h -E "^(FAILED|ERROR)" "$OUT"/test_*.log | head -20
    ;;
  profile)
    log "profile, this tree"
    timeout "$(cap 240)" python3 -m osserve bench kernels --only profile --models "$MODELS" --out "$OUT/new" \
      > "$OUT/profile-new.log" 2>&1
    grep -v "^USDT" "$OUT/profile-new.log" | tail -120
    ;;
  base)
    if [ ! -d .base/osserve ]; then echo "no .base/osserve: skipping the old kernels"; continue; fi
    log "profile, .base (old kernels)"
    cp osserve/bench/kernel_profile.py /tmp/kernel_profile.py
    (cd .base && PYTHONPATH=/tmp/site:$PWD timeout "$(cap 220)" python3 /tmp/kernel_profile.py --models "$MODELS" \
      --out "$OUT/base" > "$OUT/profile-base.log" 2>&1)
    grep -v "^USDT" "$OUT/profile-base.log" | grep -E "^(NVIDIA|[0-9a-z]+ (decode|prefill))|moe|gemm" | head -40
    if [ -f "$OUT/base/profile.json" ] && [ -f "$OUT/new/profile.json" ]; then
      python3 /tmp/kernel_profile.py --compare "$OUT/base/profile.json" "$OUT/new/profile.json" | tee "$OUT/compare.txt"
    fi
    ;;
  sweep)
    log "MoE micro-benchmark (--quick)"
    timeout "$(cap 480)" python3 -m osserve bench kernels --quick --only moe --budget-s 200 --out "$OUT/sweep" \
      > "$OUT/sweep.log" 2>&1
    grep -E "^(moe|mxfp4)|ceilings|done in" "$OUT/sweep.log" | tail -150
    ;;
  *) echo "unknown part $part (tests, profile, base, sweep)" ;;
  esac
done
log "done"
