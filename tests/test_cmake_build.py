"""The CMake build (libgencnp_fast_ops + the C++ smoke test) configures, builds and passes ctest."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_home():
    """The CUDA toolkit root, found as the CUDA build does it (scripts/cuda_env.sh)."""
    r = subprocess.run(["bash", "-c", '. scripts/cuda_env.sh >/dev/null 2>&1 && echo "$CUDA_HOME"'], cwd=ROOT,
                       capture_output=True, text=True)
    home = r.stdout.strip()
    return home if r.returncode == 0 and home else None


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "CMakeLists.txt")), reason="no CMakeLists.txt")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ)
    cfg = ["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           "-DCMAKE_PREFIX_PATH=" + torch.utils.cmake_prefix_path]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    if torch.version.cuda:  # torch's CMake config then needs the whole CUDA toolkit (nvcc on PATH may be a wrapper)
        if not torch.cuda.is_available():
            pytest.skip("torch is a CUDA build on a machine without a GPU: its CMake config needs a complete CUDA "
                        "toolkit (libnvrtc, a GPU to pick the arch); the CMake build is checked with the CPU torch")
        cuda_home = _cuda_home()
        if cuda_home is None:
            pytest.skip("torch is a CUDA build and no CUDA toolkit was found (set CUDA_HOME)")
        cfg += ["-DCUDA_TOOLKIT_ROOT_DIR=" + cuda_home, "-DCMAKE_CUDA_COMPILER=" + os.path.join(cuda_home, "bin", "nvcc")]
    def run(cmd, timeout):
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, "%s failed:\n%s\n%s" % (" ".join(cmd), r.stdout[-4000:], r.stderr[-4000:])
        return r
    run(cfg, 300)
    run(["cmake", "--build", str(build), "-j", str(max(1, os.cpu_count() or 1))], 900)
    r = run(["ctest", "--test-dir", str(build), "--output-on-failure"], 300)
    assert "100% tests passed" in r.stdout
