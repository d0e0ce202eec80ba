"""Build step for the optional CPU kernels (bitnet_jax/kernels/cpu/ffi_handlers.cc + headers).

All package metadata lives in pyproject.toml; this file only adds the C++ extension. It is
compiled against the XLA FFI headers that jaxlib ships (`jaxlib/include`, the directory
`jax.ffi.include_dir()` returns), which is why jaxlib is in [build-system] requires. The result
is bitnet_jax/kernels/cpu/_ternary_cpu<EXT_SUFFIX> (a plain shared object loaded with ctypes, not a
Python module). Works for `pip install .`, `pip install -e .` and
`python setup.py build_ext --inplace`.

The extension is optional: if it cannot be built (no C++17 compiler, no jaxlib headers, an
unsupported platform) the error is printed as a warning and installation goes on; bitnet_jax then
uses its XLA path and says so once at run time. Set BITNET_JAX_SKIP_FFI_BUILD=1 to skip it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

KERNEL = "bitnet_jax.kernels.cpu._ternary_cpu"
CPU_DIR = "bitnet_jax/kernels/cpu"


def _jaxlib_include_dir() -> str:
    """jaxlib's bundled headers without importing jax (the build env may only have jaxlib)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("jaxlib is not installed in the build environment")
    include = Path(list(spec.submodule_search_locations)[0]) / "include"
    if not (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
        raise RuntimeError(f"jaxlib at {include.parent} has no XLA FFI headers")
    return str(include)


class OptionalBuildExt(build_ext):
    """build_ext that adds jaxlib's headers and never fails the install."""

    def build_extension(self, ext):
        if ext.name != KERNEL:
            return super().build_extension(ext)
        if os.environ.get("BITNET_JAX_SKIP_FFI_BUILD", "") not in ("", "0"):
            self._warn("BITNET_JAX_SKIP_FFI_BUILD is set")
            return None
        try:
            include = _jaxlib_include_dir()
            ctype = self.compiler.compiler_type
            if ctype == "msvc":
                raise RuntimeError("MSVC builds are not supported (the kernel uses GCC/Clang "
                                   "target attributes)")
            # kernels/cpu/ffi.py compares this with the jaxlib it runs under (FFI headers only work on
            # the same or newer XLA).
            ext.define_macros.append(
                ("BITNET_JAXLIB_VERSION", f'"{importlib.metadata.version("jaxlib")}"'))
            # -isystem: jaxlib's headers are not ours to keep warning-free.
            ext.extra_compile_args = ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden",
                                      "-isystem", include]
            return super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any failure must leave the install working
            self._warn(f"{type(e).__name__}: {e}")
            return None

    def get_export_symbols(self, ext):
        # Not a Python module: there is no PyInit_ symbol to export.
        return [] if ext.name == KERNEL else super().get_export_symbols(ext)

    @staticmethod
    def _warn(reason: str) -> None:
        print(
            "WARNING: bitnet_jax's optional CPU FFI kernel was not built "
            f"({reason}); bitnet_jax will use its XLA path instead.",
            file=sys.stderr,
        )


class BuildPyWithPresets(build_py):
    """build_py that also ships the repository's configs/*.json presets as bitnet_jax/configs/,
    so `load_config("tiny")` works from a wheel as from a checkout (model/config.py)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "bitnet_jax" / "configs"
        target.mkdir(parents=True, exist_ok=True)
        for preset in sorted(Path(__file__).resolve().parent.glob("configs/*.json")):
            self.copy_file(str(preset), str(target / preset.name))


setup(
    ext_modules=[
        Extension(
            KERNEL,
            sources=[f"{CPU_DIR}/ffi_handlers.cc"],
            # Every header the one translation unit includes (all of them live beside it).
            depends=sorted(h.as_posix() for h in Path(CPU_DIR).glob("*.h")),
            language="c++",
            # Lets setuptools skip copying a missing .so into the tree for editable installs.
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt, "build_py": BuildPyWithPresets},
)
