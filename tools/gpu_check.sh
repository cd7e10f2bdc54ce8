#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command (`make gpu-check`):
#   1. a CUDA GPU is visible to torch, and the extension has its CUDA kernels
#      (rebuilt with FORCE_CUDA=1 when the in-place build has the CPU ones only);
#   2. every test that is skipped without a GPU (`pytest -m cuda`: the CUDA
#      variants of the operator and model tests, and tests/test_cpu_vs_cuda.py,
#      which compares CPU and CUDA values and gradients of both operators);
#   3. a short CUDA run of benchmarks/bench_ops.py (float32 and float16).
# Prints a summary and exits non-zero when any step fails; with no GPU it
# fails at once. Environment: PYTHON (default .venv/bin/python),
# GPU_CHECK_OUT (default output/gpu_check: logs and benchmark JSON),
# GPU_CHECK_PYTEST_ARGS (extra pytest arguments, e.g. --run-slow).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-output/gpu_check}

declare -a SUMMARY
FAILED=0
step() {  # step NAME LOG COMMAND...: runs COMMAND, output to the terminal and LOG
    local name=$1 log=$2 start=$SECONDS rc
    shift 2
    echo "==> $name"
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local verdict=ok
    if [ "$rc" -ne 0 ]; then
        verdict="FAILED (exit $rc, log $log)"
        FAILED=1
    fi
    SUMMARY+=("$(printf '%-48s %5ss  %s' "$name" $((SECONDS - start)) "$verdict")")
}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: FAILED: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False);" \
        "run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

has_cuda_kernels() {
    "$PYTHON" -c "
import sys, torch
import dcnv2_plugin.ops  # loads the extension
ok = all(torch._C._dispatch_has_kernel_for_dispatch_key(f'dcnv2::{op}', 'CUDA') for op in ('deform_conv2d', 'deform_roi_pool'))
sys.exit(0 if ok else 1)" 2>/dev/null
}
if ! has_cuda_kernels; then
    step "build the extension with its CUDA kernels" "$OUT/build.log" \
        env FORCE_CUDA=1 "$PYTHON" setup.py -q build_ext --inplace --force
    if ! has_cuda_kernels; then
        echo "gpu-check: FAILED: the extension has no CUDA kernels after the build (see $OUT/build.log)" >&2
        exit 1
    fi
fi

# shellcheck disable=SC2086  # GPU_CHECK_PYTEST_ARGS is a list of arguments
step "CUDA tests (pytest -m cuda)" "$OUT/pytest.log" \
    "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider ${GPU_CHECK_PYTEST_ARGS:-}
for dtype in float32 float16; do
    step "CUDA benchmark ($dtype, conv + pool + memory)" "$OUT/bench_$dtype.log" \
        "$PYTHON" benchmarks/bench_ops.py --device cuda --dtype "$dtype" --sections conv,pool,memory --repeat 3 \
        --json "$OUT/bench_$dtype.json"
done

echo
echo "==> gpu-check summary ($OUT)"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" -ne 0 ]; then
    echo "gpu-check: FAILED"
    exit 1
fi
echo "gpu-check: all passed"
