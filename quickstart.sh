#!/usr/bin/env bash
# crosslayer on a fresh machine (Python >= 3.10 and a CUDA toolkit; nothing else):
#
#     bash quickstart.sh demo [demo flags]    # set up, then the main job (python -m crosslayer.demo)
#     bash quickstart.sh test [pytest flags]  # set up, then the test suite (what CI runs)
#
# Setting up: a virtual environment (.venv, or $CROSSLAYER_VENV), torch ($TORCH_SPEC,
# default torch==2.14.1: a CUDA 13 build, for nvcc 13), the build tools and the project
# with its extras (".[dev]": tests, demo, benchmarks, CuPy for the JIT path), then the
# CUDA extension compiled with nvcc for the visible GPU's architecture, or
# $TORCH_CUDA_ARCH_LIST, or sm 8.0 and 9.0 without a GPU ($MAX_JOBS jobs, default one a
# core; the compiler's output in build.log). Every step is skipped when already done: the
# second command reuses the first's environment and, while csrc/, setup.py and the
# architectures are unchanged, its build (a stamp in the venv records them).
# Environment: CROSSLAYER_VENV, TORCH_SPEC, TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME
# (default: found from nvcc on PATH, else /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage; exit 2; }
job=$1
shift
case "$job" in
    demo|test) ;;
    -h|--help) usage; exit 0 ;;
    *) echo "quickstart.sh: unknown job '$job' (demo or test)"; usage; exit 2 ;;
esac

VENV=${CROSSLAYER_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null 2>&1; then
        CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    else
        CUDA_HOME=/usr/local/cuda
    fi
fi
export CUDA_HOME
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "quickstart.sh: no nvcc at $CUDA_HOME/bin/nvcc: install the CUDA toolkit or set CUDA_HOME"; exit 1; }
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
step() { printf '== %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "virtual environment $VENV"
    python3 -m venv "$VENV"
fi
source "$VENV/bin/activate"

if ! python -c "import torch" >/dev/null 2>&1; then
    step "installing $TORCH_SPEC"
    python -m pip install -q --upgrade pip
    python -m pip install -q "$TORCH_SPEC" numpy  # numpy now: torch warns on import without it
fi

# The extension is rebuilt when its sources, setup.py, the architectures or torch change.
gpu_arch() {
    python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "none")'
}
build_inputs() {
    cat setup.py pyproject.toml
    find csrc -type f | LC_ALL=C sort | xargs cat
    echo "${TORCH_CUDA_ARCH_LIST:-gpu $(gpu_arch)}"
    python -c 'import torch; print(torch.__version__)'
}
stamp_file="$VENV/.crosslayer-build"
stamp=$(build_inputs | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! python -c "import crosslayer._C" >/dev/null 2>&1; then
    step "building crosslayer and its CUDA extension (nvcc, $MAX_JOBS jobs; architectures: ${TORCH_CUDA_ARCH_LIST:-those of the visible GPU, or 8.0;9.0 without one}); log: build.log"
    start=$(date +%s)
    python -m pip install -q ninja pybind11
    CROSSLAYER_BUILD_CUDA=1 python -m pip install --no-build-isolation -v -e ".[dev]" > build.log 2>&1 || {
        grep -E "error|Error" build.log | head -50
        echo "quickstart.sh: the build failed; the whole log is build.log"
        exit 1
    }
    echo "$stamp" > "$stamp_file"
    echo "   built in $(( $(date +%s) - start )) s"
fi
python -m crosslayer.info

case "$job" in
    demo)
        step "the demo: python -m crosslayer.demo $*"
        exec python -m crosslayer.demo "$@"
        ;;
    test)
        step "the tests: python -m pytest tests -q -n 2 $*"
        set +e
        python -m pytest tests -q -n 2 "$@"
        rc=$?
        set -e
        [ "$rc" -ne 5 ] || rc=0  # no tests collected (a selection that matches none): nothing failed
        exit "$rc"
        ;;
esac
