#!/usr/bin/env bash
# The one command for a GPU machine, from the repo root:
#     bash bench/gpu_check.sh
# Builds the CUDA extension in place, runs the GPU tests, runs the quick benchmarks
# (bench_depth_aggregate.py, bench_hc.py, bench_mudd.py, bench_mhc.py, then bench_transformers.py,
# each even when another failed; bench_transformers exits 4, not a failure, where the machine
# has no transformers 5.23.0) and prints a short summary last. Logs and the results CSV go to $OUT (default
# bench/results): build.log, info.txt, tests_gpu_<backend>.log, bench_depth_aggregate.log,
# bench_hc.log, bench_mudd.log, bench_mhc.log, bench_transformers.log, results.csv (every bench appends to it).
# Environment: OUT, PYTHON (default python3, else python), TORCH_CUDA_ARCH_LIST (9.0),
# GPU_TEST_BACKENDS (default "extension jit": the GPU tests run once on each),
# MAX_JOBS (16), BENCH_ARGS (--quick), STAGES (default "tests bench"; add "demo" for the
# GPU demo table, python -m crosslayer.demo --preset gpu --steps DEMO_STEPS (300) on
# DEMO_SCHEMES (all six), logs in $OUT/demo). The build always runs first, so a device
# call limited to 10 minutes can run
#     STAGES=tests bash bench/gpu_check.sh;  STAGES=bench bash bench/gpu_check.sh
#     STAGES=demo bash bench/gpu_check.sh
# as separate calls; a stage left out reads "not run" in the summary and does not fail.
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
GPU_TEST_BACKENDS=${GPU_TEST_BACKENDS:-extension jit}
for backend in $GPU_TEST_BACKENDS; do
    case "$backend" in extension|jit) ;; *) echo "unknown backend '$backend' in GPU_TEST_BACKENDS (extension, jit)"; exit 2 ;; esac
done

BENCHES="bench_depth_aggregate bench_hc bench_mudd bench_mhc bench_transformers"
STAGES=${STAGES:-tests bench}
for stage in $STAGES; do
    case "$stage" in tests|bench|demo) ;; *) echo "unknown stage '$stage' in STAGES (tests, bench, demo)"; exit 2 ;; esac
done
has_stage() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

section() { printf '\n==== %s ====\n' "$*"; }
bench_status_of() {
    case "$1" in
        0) echo ok ;;
        2) echo "FAILED (no CUDA device)" ;;
        3) echo "FAILED (fused op WRONG, failed, missing or not fused)" ;;
        4) echo "skipped (no transformers 5.23.0 here: carry its wheel in .whl/)" ;;
        *) echo "FAILED (exit $1)" ;;
    esac
}

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
# Wheels for the benchmarks' comparators, which the GPU machine (no network) cannot
# download: fetch them on a networked machine into .whl/ (ignored by git), e.g.
#     pip download --no-deps -d .whl liger-kernel
# and carry .whl with the device call; they are installed here, without dependencies.
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-index .whl/*.whl || echo "installing .whl/*.whl failed"
fi
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
bench_rc=1
demo_rc=0
demo_status="not run"
declare -A bench_status
for b in $BENCHES; do
    bench_status[$b]="skipped (build failed)"
    rm -f "$OUT/$b.log"  # no stale log in the summary
done
if [ "$build_rc" -eq 0 ]; then
    # ---- 3. build info
    section "info"
    set +e
    "$PYTHON" -m crosslayer.info 2>&1 | tee "$OUT/info.txt"
    info_rc=${PIPESTATUS[0]}
    set -e
    [ "$info_rc" -eq 0 ] || echo "python -m crosslayer.info exited $info_rc"

    # ---- 4. GPU tests, once per backend (CROSSLAYER_BACKEND: the extension just built,
    # then the JIT path through CuPy's NVRTC; GPU_TEST_BACKENDS picks), each its own log.
    # Exit 5 = no tests collected counts as a failure: they must exist.
    if has_stage tests; then
        tests_rc=0
        tests_status=""
        tests_counts=""
        for backend in $GPU_TEST_BACKENDS; do
            section "GPU tests, backend $backend"
            log="$OUT/tests_gpu_$backend.log"
            set +e
            CROSSLAYER_BACKEND=$backend "$PYTHON" -m pytest tests -q --maxfail=25 -m gpu 2>&1 | tee "$log"
            rc=${PIPESTATUS[0]}
            set -e
            # The pytest summary line, e.g. "12 passed, 1 failed, 2 skipped in 3.41s".
            counts_re='[0-9]+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)'
            summary_line=$(grep -E "$counts_re|no tests ran" "$log" | tail -n 1 || true)
            counts=$(printf '%s\n' "$summary_line" | grep -Eo "$counts_re" | paste -sd, - || true)
            [ -n "$counts" ] || counts="no summary line"
            case "$rc" in
                0) status=passed ;;
                5) status="FAILED (no GPU tests collected, pytest exit 5)" ;;
                *) status="FAILED (pytest exit $rc)" ;;
            esac
            [ "$rc" -eq 0 ] || tests_rc=1
            tests_status="${tests_status:+$tests_status; }$backend: $status"
            tests_counts="${tests_counts:+$tests_counts | }$backend: $counts"
        done
    else
        tests_status="not run"; tests_counts="-"; tests_rc=0
    fi

    # ---- 5. quick benchmarks: each its own log, all appending to one results.csv; a
    # failing bench does not stop the next one.
    bench_rc=0
    if has_stage bench; then
        section "benchmarks"
        for b in $BENCHES; do
            section "benchmark $b"
            set +e
            # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
            "$PYTHON" "bench/$b.py" $BENCH_ARGS --csv "$OUT/results.csv" 2>&1 | tee "$OUT/$b.log"
            rc=${PIPESTATUS[0]}
            set -e
            bench_status[$b]=$(bench_status_of "$rc")
            [ "$rc" -eq 0 ] || [ "$rc" -eq 4 ] || bench_rc=1
        done
    else
        for b in $BENCHES; do bench_status[$b]="not run"; done
    fi

    # ---- 6. the demo on the GPU preset (the README's GPU results table)
    if has_stage demo; then
        section "demo (--preset gpu)"
        set +e
        "$PYTHON" -m crosslayer.demo --preset gpu --steps "${DEMO_STEPS:-300}" \
            --schemes "${DEMO_SCHEMES:-residual,shc,dhc,mhc,dwa,mudd}" --no-progress \
            --out "$OUT/demo" 2>&1 | tee "$OUT/demo.log"
        demo_rc=${PIPESTATUS[0]}
        set -e
        if [ "$demo_rc" -eq 0 ]; then demo_status=ok; else demo_status="FAILED (exit $demo_rc)"; fi
    fi
fi

# ---- 7. summary: each bench's SUMMARY / WRONG / FAILED lines, then the status table
# last (the device tool returns the tail of the output).
section "summary"
for b in $BENCHES; do
    if [ -f "$OUT/$b.log" ]; then
        echo "-- $b"
        grep -E '^(SUMMARY|WRONG|FAILED|measured copy bandwidth)' "$OUT/$b.log" || echo "(no SUMMARY lines)"
    fi
done
echo
printf '%-22s %s\n' "build" "$build_status"
printf '%-22s %s [%s]\n' "GPU tests" "$tests_status" "$tests_counts"
for b in $BENCHES; do
    printf '%-22s %s\n' "$b" "${bench_status[$b]}"
done
printf '%-22s %s\n' "demo (gpu preset)" "$demo_status"
logs="build.log,info.txt,$(printf 'tests_gpu_%s.log,' $GPU_TEST_BACKENDS)"
logs=${logs%,}
for b in $BENCHES; do logs="$logs,$b.log"; done
printf '%-22s %s\n' "logs" "$OUT/{$logs,results.csv}"

if [ "$build_rc" -ne 0 ] || [ "$tests_rc" -ne 0 ] || [ "$bench_rc" -ne 0 ] || [ "$demo_rc" -ne 0 ]; then
    exit 1
fi
exit 0
