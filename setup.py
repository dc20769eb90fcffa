"""Build script: pure-Python package plus the optional C++/CUDA extension ``icakd_fast._C``.

The extension is optional: ``ICAKD_SKIP_EXT=1`` skips it, and so does a tree without sources or an
environment without torch (build with ``pip install --no-build-isolation`` so that setup.py sees
the installed torch).

Environment variables:

* ``ICAKD_SKIP_EXT=1``   -- pure-Python install (reference and triton backends only).
* ``FORCE_CUDA=1``       -- compile the CUDA kernels even when no GPU is visible (needs nvcc and
  ``CUDA_HOME``); otherwise CUDA kernels are built only when ``torch.cuda.is_available()``.
* ``ICAKD_CUDA_ARCHS``   -- CUDA architectures, e.g. ``"9.0"`` or ``"8.0;9.0"`` (sets
  ``TORCH_CUDA_ARCH_LIST``; default: the visible GPUs, or 9.0 when none is visible).
* ``MAX_JOBS``           -- parallel compile jobs of ninja (torch's BuildExtension reads it).
* ``ICAKD_DEBUG=1``      -- -O0 -g instead of -O3.
* ``ICAKD_SANITIZE=address`` -- AddressSanitizer build of the host code (-O1 -g
  -fsanitize=address); run it with ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)
  ASAN_OPTIONS=detect_leaks=0`` (see docs/cpp_extension.md).

Build metadata (torch and CUDA versions, architectures) is written to ``_build_info.json`` beside
the compiled library; ``icakd_fast/_ext.py`` compares it with the running torch.
"""

import glob
import json
import os

from setuptools import find_packages, setup

packages = find_packages(include=["icakd_fast", "icakd_fast.*"]) + ["icakd_fast.kernels"]
package_dir = {"icakd_fast.kernels": "kernels"}

ext_modules = []
cmdclass = {}

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _extension():
    """(ext_modules, cmdclass) for icakd_fast._C, or ([], {}) when it is skipped."""
    if _flag("ICAKD_SKIP_EXT"):
        print("icakd_fast: ICAKD_SKIP_EXT=1, skipping the C++/CUDA extension")
        return [], {}
    csrc = os.path.join(HERE, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # pragma: no cover - depends on the build environment
        print(f"icakd_fast: torch is not importable here ({exc}); skipping the extension "
              "(install with --no-build-isolation to build it)")
        return [], {}

    with_cuda = (_flag("FORCE_CUDA") or torch.cuda.is_available()) and CUDA_HOME is not None
    if _flag("FORCE_CUDA") and CUDA_HOME is None:
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
    debug = _flag("ICAKD_DEBUG")
    sanitize = os.environ.get("ICAKD_SANITIZE", "").strip()
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # the sanitizer instruments the C++ (host) sources only; nvcc keeps its own flags
    link_flags = ["-fopenmp"]
    if sanitize:
        opt = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}"]
        link_flags.append(f"-fsanitize={sanitize}")
    cxx_flags = opt + ["-fopenmp"]
    define_macros = []
    archs = None
    rel = [os.path.relpath(s, HERE) for s in sources]
    if with_cuda:
        archs = os.environ.get("ICAKD_CUDA_ARCHS", "").strip()
        if archs:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs")
        rel += sorted(os.path.relpath(s, HERE) for s in glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        define_macros.append(("ICAKD_WITH_CUDA", None))
        nvcc_flags = (["-O0", "-g"] if debug else ["-O3"]) + ["--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "icakd_fast._C",
            rel,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "icakd_fast._C",
            rel,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else "cpu",
        "with_cuda": bool(with_cuda),
        "cuda_archs": archs,
        "debug": debug,
        "sanitize": sanitize or None,
    }

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """BuildExtension (ninja) that writes _build_info.json beside the built library."""

        def run(self):
            super().run()
            for e in self.extensions:
                lib = self.get_ext_fullpath(e.name)
                target = os.path.join(os.path.dirname(lib), "_build_info.json")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "w") as fh:
                    json.dump(dict(info, library=os.path.basename(lib)), fh, indent=1)
                print(f"icakd_fast: wrote {target}")

    print(f"icakd_fast: building icakd_fast._C ({'CPU + CUDA ' + str(archs) if with_cuda else 'CPU only'})")
    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extension()

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass,
      package_data={"icakd_fast.train.presets": ["*.toml"]})
