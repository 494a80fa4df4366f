# Sourced by .ci/cuda_build.sh and scripts/gpu_check.sh: the environment a CUDA build of gencnp_fast needs.
#
#   PY=/path/to/python . scripts/cuda_env.sh      (PY: the Python whose torch the extension is built against)
#
# Exports CUDA_HOME (the real toolkit root: the nvcc on PATH may be a wrapper script, so torch's own guess from
# `which nvcc` can be wrong), puts its bin/ first on PATH, and adds the torch venv's nvidia/cu13/include to CPATH
# (headers the toolkit lacks, e.g. cuDNN / NCCL, pulled in by torch's headers). Returns 1 if no toolkit is found.

_gencnp_find_cuda_home() {
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && [ -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
        echo "$CUDA_HOME"; return 0
    fi
    # The nvcc on PATH may be a wrapper (e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`): follow it.
    local n real d
    n="$(command -v nvcc || true)"
    if [ -n "$n" ]; then
        real="$(readlink -f "$n")"
        if head -c 2 "$real" | grep -q '#!'; then
            real="$(grep -oE '/[^ "]*/bin/nvcc' "$real" | head -n1 || true)"
        fi
        if [ -n "$real" ] && [ -f "$(dirname "$(dirname "$real")")/include/cuda_runtime.h" ]; then
            dirname "$(dirname "$real")"; return 0
        fi
    fi
    for d in /usr/local/cuda /usr/local/cuda-*; do
        if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then readlink -f "$d"; return 0; fi
    done
    return 1
}

if CUDA_HOME="$(_gencnp_find_cuda_home)"; then
    export CUDA_HOME
    export PATH="$CUDA_HOME/bin:$PATH"
    _gencnp_cu13_inc="$("${PY:-python3}" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))' 2>/dev/null || true)"
    if [ -n "$_gencnp_cu13_inc" ] && [ -d "$_gencnp_cu13_inc" ]; then
        export CPATH="$_gencnp_cu13_inc${CPATH:+:$CPATH}"
    fi
    unset _gencnp_cu13_inc
else
    unset CUDA_HOME
    echo "cuda_env.sh: no CUDA toolkit found (set CUDA_HOME)" >&2
    return 1 2>/dev/null || exit 1
fi
