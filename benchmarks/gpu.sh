#!/usr/bin/env bash
# The GPU checks and figures, in one command, for the day a CUDA machine is available:
#   bash benchmarks/gpu.sh [OUT_DIR]
# 1. the `cuda` tests (the CuPy backend against the float64 reference backend);
# 2. compute-sanitizer memcheck and racecheck over those tests;
# 3. `robustlr bench op --device cuda` at the four LR-Net-26 stage shapes (fp32 and bf16);
# 4. `robustlr bench model --device cuda`: lrnet26, resnet26, resnet50 at 224, batch 64, fp32
#    (the bench CLI has no dtype option yet, so no bf16 model row);
# 5. a short PGD-16 adversarial-training throughput run of lrnet26 and resnet26;
# and prints one table of what ran, its status and where its output is. Without a GPU it runs
# the CPU-side parts (the emulator and ptxas-budget tests, the ptxas report, the roofline
# prediction that bench op's figures are to be compared with) and marks the GPU
# parts "skipped (no CUDA device)".
set -uo pipefail
out=${1:-bench-gpu}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.tsv"
printf 'step\tstatus\tseconds\toutput\n' >"$summary"
py=${PYTHON:-python}

step() {  # step NAME LOGFILE COMMAND...
    local name=$1 log=$2
    shift 2
    local start=$SECONDS
    echo "== $name"
    if (cd "$repo" && "$@") >"$log" 2>&1; then status=ok; else status="FAILED (rc $?)"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$log" >>"$summary"
    tail -n 3 "$log"
}

skip() {  # skip NAME REASON
    echo "== $1: skipped ($2)"
    printf '%s\tskipped (%s)\t0\t-\n' "$1" "$2" >>"$summary"
}

# ---- CPU-side parts (run everywhere) ----------------------------------------------------------
step "emulator + budget tests (CPU)" "$out/cpu-tests.log" \
    "$py" -m pytest -q -m "slow or not slow" tests/test_kernels_host.py \
    tests/test_kernels_emulator.py tests/test_kernels_budget.py tests/test_kernels_planning.py \
    tests/test_kernels_nvrtc.py
step "ptxas report (NVRTC)" "$out/ptxas.md" "$py" benchmarks/ptxas_report.py
step "roofline prediction (to set beside bench op)" "$out/roofline.md" "$py" benchmarks/roofline.py

# ---- GPU parts ----------------------------------------------------------------------------------
if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    step "cuda tests" "$out/cuda-tests.log" "$py" -m pytest -q -m cuda tests/test_cupy_backend.py
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
            step "compute-sanitizer $tool" "$out/sanitizer-$tool.log" \
                compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
                "$py" -m pytest -q -m cuda tests/test_cupy_backend.py -k "not larger_shape"
        done
    else
        skip "compute-sanitizer" "compute-sanitizer not on PATH"
    fi
    for dtype in float32 bfloat16; do
        step "bench op $dtype" "$out/op-$dtype.log" "$py" -m robustlr bench op --device cuda \
            --batch-size 32 --dtype "$dtype" --backend cupy --csv "$out/op-$dtype.csv"
    done
    step "bench model fp32" "$out/model.log" "$py" -m robustlr bench model --device cuda \
        --archs resnet26,lrnet26,resnet50 --input-size 224 --batch-size 64 \
        --csv "$out/model.csv"
    for arch in resnet26 lrnet26; do
        step "PGD-16 advtrain $arch" "$out/adv-$arch.log" "$py" -m robustlr advtrain \
            --arch "$arch" --steps 16 --epochs 1 --device cuda --out "$out/adv-$arch" \
            --set max_steps_per_epoch=16
    done
else
    for name in "cuda tests" "compute-sanitizer" "bench op" "bench model" "PGD-16 advtrain"; do
        skip "$name" "no CUDA device"
    done
fi

echo
echo "== summary ($summary)"
column -t -s $'\t' "$summary" 2>/dev/null || cat "$summary"
! grep -q FAILED "$summary"
