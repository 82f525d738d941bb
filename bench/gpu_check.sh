#!/usr/bin/env bash
# The one command for a GPU machine, from the repo root:
#     bash bench/gpu_check.sh
# Builds the CUDA extension in place, runs the GPU tests, runs the quick benchmarks and
# prints a short summary last. Logs and the results CSV go to $OUT (default
# bench/results): build.log, info.txt, tests_gpu.log, bench_depth_aggregate.log,
# results.csv.
# Environment: OUT, PYTHON (default python3, else python), TORCH_CUDA_ARCH_LIST (9.0),
# MAX_JOBS (16), BENCH_ARGS (--quick).
# Exit status: 0 when the build, the GPU tests and the benchmarks' correctness gates
# all passed; 1 otherwise.
set -euo pipefail

OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
BENCH_ARGS=${BENCH_ARGS:---quick}

section() { printf '\n==== %s ====\n' "$*"; }

# ---- 1. machine
section "machine"
nvidia-smi -L || echo "nvidia-smi failed"
"$PYTHON" -c 'import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__,
      "| CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| cc %d.%d" % (p.major, p.minor), "| SMs", p.multi_processor_count,
          "| L2 %.0f MB" % (getattr(p, "L2_cache_size", 0) / 1e6))' \
    || echo "could not import torch with $PYTHON"
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2 || echo "nvcc not on PATH"

# ---- 2. build in place (ptxas register/spill report lands in build.log)
section "build"
set +e
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    CROSSLAYER_BUILD_CUDA=1 CROSSLAYER_PTXAS_VERBOSE=1 \
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.log"
build_rc=${PIPESTATUS[0]}
set -e
if [ "$build_rc" -eq 0 ]; then build_status=ok; else build_status="FAILED (pip exit $build_rc)"; fi
echo "build: $build_status"

tests_status="skipped (build failed)"
tests_counts="-"
tests_rc=1
bench_status="skipped (build failed)"
bench_rc=1
if [ "$build_rc" -eq 0 ]; then
    # ---- 3. build info
    section "info"
    set +e
    "$PYTHON" -m crosslayer.info 2>&1 | tee "$OUT/info.txt"
    info_rc=${PIPESTATUS[0]}
    set -e
    [ "$info_rc" -eq 0 ] || echo "python -m crosslayer.info exited $info_rc"

    # ---- 4. GPU tests (exit 5 = no tests collected counts as a failure: they must exist)
    section "GPU tests"
    set +e
    "$PYTHON" -m pytest tests -q --maxfail=25 -m gpu 2>&1 | tee "$OUT/tests_gpu.log"
    tests_rc=${PIPESTATUS[0]}
    set -e
    # The pytest summary line, e.g. "12 passed, 1 failed, 2 skipped in 3.41s".
    counts_re='[0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)'
    summary_line=$(grep -E "$counts_re|no tests ran" "$OUT/tests_gpu.log" | tail -n 1 || true)
    tests_counts=$(printf '%s\n' "$summary_line" | grep -Eo "$counts_re" | paste -sd, - || true)
    [ -n "$tests_counts" ] || tests_counts="no summary line"
    case "$tests_rc" in
        0) tests_status=passed ;;
        5) tests_status="FAILED (no GPU tests collected, pytest exit 5)" ;;
        *) tests_status="FAILED (pytest exit $tests_rc)" ;;
    esac

    # ---- 5. quick benchmarks
    section "benchmarks"
    set +e
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    "$PYTHON" bench/bench_depth_aggregate.py $BENCH_ARGS --csv "$OUT/results.csv" 2>&1 \
        | tee "$OUT/bench_depth_aggregate.log"
    bench_rc=${PIPESTATUS[0]}
    set -e
    case "$bench_rc" in
        0) bench_status=ok ;;
        2) bench_status="FAILED (no CUDA device)" ;;
        3) bench_status="FAILED (fused op WRONG, failed or not fused)" ;;
        *) bench_status="FAILED (exit $bench_rc)" ;;
    esac
fi

# ---- 6. summary
section "summary"
printf '%-12s %s\n' "build" "$build_status"
printf '%-12s %s [%s]\n' "GPU tests" "$tests_status" "$tests_counts"
printf '%-12s %s\n' "benchmarks" "$bench_status"
printf '%-12s %s\n' "logs" "$OUT/{build.log,info.txt,tests_gpu.log,bench_depth_aggregate.log,results.csv}"
if [ -f "$OUT/bench_depth_aggregate.log" ]; then
    grep -E '^(SUMMARY|WRONG|FAILED|measured copy bandwidth)' "$OUT/bench_depth_aggregate.log" || true
fi

if [ "$build_rc" -ne 0 ] || [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ]; then
    exit 1
fi
exit 0
