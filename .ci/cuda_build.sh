#!/usr/bin/env bash
# Compile check of the CUDA sources (csrc/cuda/*.cu) without a GPU (docs/design.md §7).
#
#   bash .ci/cuda_build.sh [SOURCE_DIR]        (default: the repository root)
#
# 1. a separate venv ($CUDA_VENV, default /tmp/cuda-venv; reused when present) with the CUDA build of torch
#    (torch==2.14.1, cu130: ~5.5 GB, pip takes it from the local wheel mirror) + numpy, pytest, ninja, setuptools;
# 2. CUDA_HOME = the real CUDA toolkit root (the nvcc on PATH may be a wrapper script, so torch's own guess from
#    `which nvcc` would be wrong), TORCH_CUDA_ARCH_LIST=9.0 (H100; there is no GPU to detect), the venv's
#    nvidia/cu13/include on CPATH (headers the toolkit lacks, e.g. cuDNN/NCCL pulled in by torch's headers);
# 3. GENCNP_FAST_FORCE_CUDA=1 pip install --no-build-isolation SOURCE_DIR   (builds CPU + CUDA kernels);
# 4. pytest tests/test_cuda_build.py in that venv: every gencnp_fast op has a CUDA kernel registered.
#
# Env: CUDA_VENV, TORCH_CUDA_VERSION (2.14.1), TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (2), CUDA_HOME (auto).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$(cd "${1:-$REPO}" && pwd)"
VENV="${CUDA_VENV:-/tmp/cuda-venv}"
TORCH_VERSION="${TORCH_CUDA_VERSION:-2.14.1}"
t0=$(date +%s)
say() { echo "[cuda_build +$(( $(date +%s) - t0 ))s] $*"; }

# ---- 1. venv with the CUDA build of torch
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
have_torch="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda or "cpu")' 2>/dev/null || true)"
if [ "${have_torch%% *}" != "$TORCH_VERSION" ] || [ "${have_torch##* }" = "cpu" ]; then
    say "installing torch==$TORCH_VERSION (CUDA build) into $VENV"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" numpy pytest ninja setuptools wheel
else
    "$PY" -m pip install -q numpy pytest ninja setuptools wheel
fi
"$PY" -c 'import torch; assert torch.version.cuda, "torch in the venv is a CPU build"; print("torch", torch.__version__, "cuda", torch.version.cuda)'

# ---- 2. toolkit (CUDA_HOME, PATH, CPATH: scripts/cuda_env.sh)
# shellcheck disable=SC1091
. "$REPO/scripts/cuda_env.sh"  # uses $PY
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
say "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)) TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CPATH=${CPATH:-}"

# ---- 3. build (CPU + CUDA kernels) against the venv's torch, from a clean copy of the sources (an in-tree
# build would mix objects with the CPU build's build/ folder and the in-place gencnp_fast/_C*.so)
WORK="${CUDA_BUILD_DIR:-/tmp/gencnp-cuda-src}"
rm -rf "$WORK" && mkdir -p "$WORK"
(cd "$SRC" && tar --exclude=./build --exclude=./.git --exclude='*.so' --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=./benchmarks/results -cf - .) | (cd "$WORK" && tar -xf -)
LOG="$WORK/pip-install.log"
say "building a copy of $SRC in $WORK with GENCNP_FAST_FORCE_CUDA=1 (log: $LOG)"
"$PY" -m pip uninstall -y -q gencnp_fast >/dev/null 2>&1 || true
set +e
(cd "$WORK" && GENCNP_FAST_FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation --no-deps . >"$LOG" 2>&1)
rc=$?
set -e
grep -E "gencnp_fast: CUDA|Successfully installed" "$LOG" || true
if [ $rc -ne 0 ]; then
    grep -nE "error|Error" "$LOG" | head -n 40 >&2 || true
    tail -n 30 "$LOG" >&2
    echo "[cuda_build] pip install failed (rc=$rc)" >&2
    exit $rc
fi
grep -q "gencnp_fast: CUDA sources built" "$LOG" || { echo "[cuda_build] the CUDA sources were not built" >&2; exit 1; }
say "build ok"

# ---- 4. registration test (outside the source tree, so the installed package is the one imported)
say "pytest tests/test_cuda_build.py"
cd /tmp
"$PY" -m pytest -q -p no:cacheprovider "$SRC/tests/test_cuda_build.py" --rootdir=/tmp
say "done"
