"""Build of gencnp_fast and its compiled extension gencnp_fast._C.

    pip install --no-build-isolation .        # or -e . (the build needs the installed torch)

CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are
built when torch has CUDA and nvcc/CUDA_HOME is found, and then -DWITH_CUDA is defined.

Environment:
    GENCNP_FAST_FORCE_CUDA=1   build the CUDA sources or fail loudly
    GENCNP_FAST_SKIP_CUDA=1    never build the CUDA sources
    GENCNP_FAST_MARCH=<arch>   value of -march= for the CPU kernels (default: native;
                               "none" adds no -march flag), e.g. x86-64-v2 for portable wheels
    GENCNP_FAST_DEBUG=1        -O0 -g instead of -O3
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cuda_available():
    """(build_cuda, reason) for the CUDA sources."""
    if _flag("GENCNP_FAST_SKIP_CUDA"):
        return False, "GENCNP_FAST_SKIP_CUDA=1"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return False, "no csrc/cuda/*.cu sources"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, "torch.version.cuda=%s, CUDA_HOME=%s" % (torch.version.cuda, CUDA_HOME)


def _libstdcxx():
    """The libstdc++ this process (Python with torch) has loaded, by absolute path ([] if none: not Linux/GCC).

    Linking it by path binds every libstdc++ symbol of the extension to the shared library torch uses, even where
    the environment links a static copy (LDFLAGS=-static-libstdc++, compiler specs, or no libstdc++.so symlink):
    a second libstdc++ inside the extension breaks number formatting in its error messages (a std::locale facet of
    one copy used through the other: seen as a segfault on one GPU machine, as messages cut at the first number
    on another). tests/test_ops.py::test_extension_shares_the_process_libstdcxx checks the result.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return []
    paths = sorted(p for p in paths if os.path.isfile(p))
    return paths[:1]


def _extensions():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    march = os.environ.get("GENCNP_FAST_MARCH", "native").strip()
    debug = _flag("GENCNP_FAST_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp", "-fvisibility=hidden"]  # torch.utils.cpp_extension adds -std=c++20
    if march and march.lower() != "none":
        cxx.append("-march=%s" % march)
    link = _libstdcxx() + ["-fopenmp"]

    build_cuda, reason = _cuda_available()
    if _flag("GENCNP_FAST_FORCE_CUDA") and not build_cuda:
        raise RuntimeError("GENCNP_FAST_FORCE_CUDA=1 but the CUDA extension cannot be built: " + reason)
    print("gencnp_fast: CUDA sources %s (%s)" % ("built" if build_cuda else "skipped", reason))

    if build_cuda:
        from torch.utils.cpp_extension import CUDAExtension

        nvcc = ["-O3", "-DWITH_CUDA"]
        return [
            CUDAExtension(
                "gencnp_fast._C",
                cpu_sources + cuda_sources,
                define_macros=[("WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "gencnp_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


setup(
    name="gencnp_fast",
    version="0.1.0",
    description="GEN-CNP neural-pathway explanations with sparse-compute (channel-skipping) CPU/CUDA kernels",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src", include=["gencnp_fast", "gencnp_fast.*"]),
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"]},
    entry_points={"console_scripts": ["gencnp = gencnp_fast.cli:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    zip_safe=False,
)
