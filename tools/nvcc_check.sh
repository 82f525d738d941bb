#!/usr/bin/env bash
# Compiles launcher files with nvcc exactly as setup.py does (flags, torch headers,
# sm 8.0 and 9.0 unless TORCH_CUDA_ARCH_LIST says otherwise) without building the whole
# extension, and prints ptxas's register/spill report for their kernels:
#     bash tools/nvcc_check.sh csrc/hc_post.cu [csrc/... ]
# Needs a CUDA build of torch and nvcc (CUDA_HOME, default /usr/local/cuda).
set -euo pipefail
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH_INC=$(python -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-I" + p for p in include_paths()))')
PY_INC=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
# csrc/build_flags.json: the flags setup.py passes (release, the defines, ptxas's report).
FLAGS=$(python -c 'import json, sys; f = json.load(open(sys.argv[1])); print(" ".join(f["nvcc_release"] + f["nvcc"] + f["defines"] + f["ptxas_verbose"]))' "$ROOT/csrc/build_flags.json")
GENCODE=""
for arch in $(echo "${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" | tr ';' ' '); do
    sm=${arch/./}
    GENCODE+=" -gencode=arch=compute_${sm},code=sm_${sm}"
done
OUT=$(mktemp -d)
for src in "$@"; do
    echo "== $src"
    "$CUDA_HOME/bin/nvcc" -c "$src" -o "$OUT/$(basename "$src").o" -I"$ROOT/csrc" $TORCH_INC -I"$PY_INC" \
        -std=c++20 -Xcompiler -fPIC $FLAGS \
        -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C $GENCODE 2> "$OUT/ptxas.log"
    python "$ROOT/tools/ptxas_report.py" "$OUT/ptxas.log" | tail -n 25
done
rm -rf "$OUT"
