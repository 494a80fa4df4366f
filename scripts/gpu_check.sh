#!/usr/bin/env bash
# Everything a GPU can show about the GPU backends, in one call on a lent machine (docs/gpu.md):
#
#   bash scripts/gpu_check.sh
#
#   1. environment (nvidia-smi, torch / CUDA / cuDNN / Triton versions)        -> summary.txt
#   2. build the extension with its CUDA kernels (GENCNP_FAST_FORCE_CUDA=1)     -> build.log
#   3. GPU tests: the cuda and triton cases of tests/test_ops.py, tests/test_engine.py, tests/test_run_indices.py,
#      tests/test_triton_kernel.py and tests/test_cuda_build.py (both backends against float64 oracles and the dense
#      masked reference, float32 / float16 / bfloat16), then tests/test_workloads.py (the CLI with --device auto)
#                                                                                -> tests.log
#   4. a per-layer profile of VGG-16 224x224 batch 64 per sample d0.25 for each backend (benchmarks/layer_profile.py:
#      each conv against cuDNN's dense layer and the ideal)                      -> summary.txt
#   5. benchmarks, the issue's must-reach cases first: VGG-16 and ResNet-50 at 224x224, batch 64, per-sample masks,
#      density 1 / 0.5 / 0.25, both backends, beside cuDNN dense and the dense masked reference
#                                                                                -> bench.log, gpu_<card>_mustreach.json
#      then explain throughput (images/s) of ResNet-50 at 224x224, batch 256, beside cuDNN's dense forward
#                                                                                -> gpu_<card>_throughput.json
#   6. if time is left: VGG-16-BN and ResNet-18 at 32x32, batch 64, shared / per-class / per-sample, density 0.5 / 0.25
#                                                                                -> gpu_<card>_cifar.json
#   Every benchmark table is also appended to summary.txt (8 files at most come back from a lent machine).
#
# Every step has a time limit taken from one budget (GPU_CHECK_BUDGET_S, default 540 s: a 600 s call with room to
# copy results back); a benchmark cut short still leaves the cases it finished (the snapshot is rewritten after each).
# Results go to $OUT (the lent machine's result folder; default ./gpu_check_out), 8 files at most.
#
# Env: OUT, GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (default "build,tests,profile,bench,throughput,bench32"), GPU_CHECK_TEST_CAP
# (240 s), GPU_CHECK_TEST_K (the -k of the GPU tests), GPU_CHECK_WORKLOAD_CAP (120 s), GPU_CHECK_XDIST (8 test processes
# when pytest-xdist is there), GPU_CHECK_BENCH_MODELS / GPU_CHECK_BENCH_DENSITIES (must-reach cases), TORCH_CUDA_ARCH_LIST
# (default: the visible GPU's), MAX_JOBS (default: all cores), PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
STEPS=",${GPU_CHECK_STEPS:-build,tests,profile,bench,throughput,bench32},"
export PYTHONUNBUFFERED=1
t0=$(date +%s)

say() { echo "[gpu_check +$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
# limit CAP: the step's cap, or what is left of the budget if less
limit() { local l; l=$(left); if (( l < $1 )); then echo "$l"; else echo "$1"; fi; }
want() { [[ "$STEPS" == *",$1,"* ]]; }

# ---- 1. environment
{
    echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    "$PY" - <<'PY' 2>&1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| capability %d.%d" % (p.major, p.minor), "| SMs", p.multi_processor_count,
          "| memory %.1f GiB" % (p.total_memory / 2**30))
PY
    (command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1) || echo "nvcc not on PATH"
} >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no GPU visible to torch: nothing to check here (the CPU suite is: python -m pytest -q)"
    exit 2
fi
CARD="$("$PY" -c "import re, torch; n = torch.cuda.get_device_name(0).lower(); m = re.search(r'[a-z]\d{2,3}', n.replace('nvidia', '')); print(m.group(0) if m else re.sub(r'[^a-z0-9]+', '_', n).strip('_'))")"
say "card: $CARD, budget ${BUDGET}s, steps ${STEPS//,/ }"

# ---- 2. build (CPU + CUDA kernels, in place; nothing is fetched: --no-index)
if want build; then
    # shellcheck disable=SC1091
    . scripts/cuda_env.sh || { say "no CUDA toolkit: cannot build the CUDA kernels"; exit 1; }
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")}"
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    say "build: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
    GENCNP_FAST_FORCE_CUDA=1 timeout "$(limit 300)" "$PY" -m pip install --no-build-isolation --no-deps --no-index \
        -e . >"$OUT/build.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then  # an older pip / setuptools without editable wheels: build in place instead
        say "pip install -e failed (rc=$rc); trying setup.py build_ext --inplace"
        GENCNP_FAST_FORCE_CUDA=1 timeout "$(limit 300)" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
        rc=$?
    fi
    grep -E "gencnp_fast: CUDA|Successfully installed|error" "$OUT/build.log" | head -n 20 | tee -a "$OUT/summary.txt"
    if [ $rc -ne 0 ]; then
        tail -n 40 "$OUT/build.log"
        say "build FAILED (rc=$rc): see build.log"
        exit 1
    fi
    say "build ok"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, gencnp_fast.ops; from gencnp_fast.plan import available_backends; print('CUDA kernel registered:', torch._C._dispatch_has_kernel_for_dispatch_key('gencnp_fast::gathered_conv2d', 'CUDA'), '| backends for cuda tensors:', available_backends('cuda'))" 2>&1 | tee -a "$OUT/summary.txt"

# ---- 3. GPU tests
if want tests; then
    # pytest-xdist when present (Triton compiles its kernels on the CPU: 8 processes share that work); a worker
    # whose CUDA context a device-side assert ended exits and is replaced (tests/conftest.py)
    XDIST=()
    "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_XDIST:-8}")
    # the compiled op's argument errors first, CPU and CUDA tensors, one process, verbose: on the H200 runs of
    # be658c2 and 7f71293 a bad argument crashed the process (segfault) instead of raising. A crashing case is
    # named, rerun alone with a native backtrace (GENCNP_FAST_CRASH_TRACE=1, csrc/crash_trace.cpp) resolved by
    # addr2line (pytest's faulthandler off in that rerun: it would take the signal first), and left out of the
    # next pass, until a pass ends without a crash (4 passes at most).
    : >"$OUT/tests.log"
    DESELECT=()
    for pass in 1 2 3 4; do
        timeout "$(limit 90)" "$PY" -m pytest -v -rfEs -p no:cacheprovider -p no:xdist -o faulthandler_timeout=60 \
            -k "bad_input_raises and (cpu or cuda)" "${DESELECT[@]}" tests/test_ops.py >"$OUT/args_pass.log" 2>&1
        rc=$?
        cat "$OUT/args_pass.log" >>"$OUT/tests.log"
        say "op argument errors (cpu, cuda), pass $pass, rc=$rc: $(grep -E '(passed|failed|error)' "$OUT/args_pass.log" | tail -n 1)"
        crashed="$(grep -oE '^tests/test_ops.py::[^ ]+ Fatal Python error' "$OUT/args_pass.log" | head -n 1 | cut -d' ' -f1)"
        [ -n "$crashed" ] || break
        say "  crash in $crashed: native backtrace"
        GENCNP_FAST_CRASH_TRACE=1 timeout "$(limit 60)" "$PY" -m pytest -q -s -p no:cacheprovider -p no:xdist -p no:faulthandler \
            "$crashed" >"$OUT/crash_trace.log" 2>&1
        SO="$("$PY" -c 'import gencnp_fast._C as C; print(C.__file__)' 2>/dev/null)"
        sed -n '/native backtrace (GENCNP_FAST_CRASH_TRACE)/,$p' "$OUT/crash_trace.log" \
            | head -n 24 | while IFS= read -r line; do
                off="$(sed -nE 's/.*_C\.[^(]*\.so\(\+(0x[0-9a-f]+)\).*/\1/p' <<<"$line")"
                if [ -n "$off" ] && [ -n "$SO" ] && command -v addr2line >/dev/null; then
                    line="$line  <- $(addr2line -f -C -e "$SO" "$off" | paste -sd' ')"
                fi
                echo "    $line"
            done | tee -a "$OUT/summary.txt"
        cat "$OUT/crash_trace.log" >>"$OUT/tests.log"
        DESELECT+=(--deselect "$crashed")
    done
    rm -f "$OUT/args_pass.log"
    say "tests (limit $(limit "${GPU_CHECK_TEST_CAP:-240}")s, ${XDIST[*]:-no xdist})"
    # SIGINT at the limit: pytest stops and still prints its summary (which tests failed, which worker crashed where)
    timeout -s INT -k 20 "$(limit "${GPU_CHECK_TEST_CAP:-240}")" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
        "${XDIST[@]}" -k "${GPU_CHECK_TEST_K:-(cuda or triton or gpu) and not (bad_input_raises and cuda)}" \
        "${DESELECT[@]}" tests/test_cuda_build.py tests/test_ops.py \
        tests/test_engine.py tests/test_run_indices.py tests/test_triton_kernel.py >>"$OUT/tests.log" 2>&1
    rc=$?
    say "tests rc=$rc: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
    # the CLI pipeline on the GPU (--device auto is cuda there): train / explain / evaluate on JPEG folders
    timeout "$(limit "${GPU_CHECK_WORKLOAD_CAP:-120}")" "$PY" -m pytest -q -rfEs -p no:cacheprovider \
        -k "not peak_memory" tests/test_workloads.py >>"$OUT/tests.log" 2>&1
    say "workload tests rc=$?: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 30 | tee -a "$OUT/summary.txt"
fi

# ---- 4./5. profile and benchmarks (results rewritten after every case, so a cut-short run keeps what it measured)
bench() {  # bench NAME CAP  (GENCNP_BENCH_* in the environment select the cases)
    local name="gpu_${CARD}_$1" cap
    cap=$(limit "$2")
    if (( cap < 30 )); then say "skip $name: ${cap}s left"; return; fi
    say "benchmark $name (limit ${cap}s): models=$GENCNP_BENCH_MODELS batches=$GENCNP_BENCH_BATCHES sharing=$GENCNP_BENCH_SHARING densities=$GENCNP_BENCH_DENSITIES"
    timeout -s INT "$cap" "$PY" -m pytest -q -p no:cacheprovider "${BENCH_FILE:-benchmarks/test_bench_gpu.py}" \
        --benchmark-only --save-results "$name" >>"$OUT/bench.log" 2>&1
    say "$name rc=$? (124: cut at the limit; its finished cases are kept)"
    # the table goes into summary.txt, the JSON alongside (8 files at most come back)
    cp -f "benchmarks/results/$name.json" "$OUT/" 2>/dev/null || say "no results for $name"
    [ -f "benchmarks/results/$name.md" ] && tee -a "$OUT/summary.txt" <"benchmarks/results/$name.md" >/dev/null
}
if want profile; then  # where the GPU kernels lose: per layer against cuDNN's dense layer and the ideal
    for be in cuda triton; do
        cap=$(limit 60)
        if (( cap < 20 )); then say "skip profile $be: ${cap}s left"; continue; fi
        say "layer profile, VGG-16 224x224 batch 64 per sample d0.25, $be (limit ${cap}s)"
        timeout "$cap" "$PY" benchmarks/layer_profile.py --model vgg16 --size 224 --batch 64 --density 0.25 \
            --sharing per_sample --rounds 3 --device cuda --backend "$be" 2>&1 | tee -a "$OUT/summary.txt" | tail -n 3
    done
fi
if want bench; then
    GENCNP_BENCH_MODELS="${GPU_CHECK_BENCH_MODELS:-vgg16,resnet50}" GENCNP_BENCH_BATCHES=64 \
    GENCNP_BENCH_SHARING=per_sample GENCNP_BENCH_DENSITIES="${GPU_CHECK_BENCH_DENSITIES:-1,0.5,0.25}" \
    bench mustreach 330
fi
if want throughput; then  # explain throughput, ResNet-50 224x224 batch 256, against cuDNN's dense forward
    BENCH_FILE=benchmarks/test_bench_throughput.py GENCNP_BENCH_MODELS=resnet50 bench throughput 120
fi
if want bench32; then
    GENCNP_BENCH_MODELS=vgg16_bn_cifar,resnet18_cifar GENCNP_BENCH_BATCHES=64 \
    GENCNP_BENCH_SHARING=shared,per_class,per_sample GENCNP_BENCH_DENSITIES=0.5,0.25 bench cifar 300
fi
say "done"
