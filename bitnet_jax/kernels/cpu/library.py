"""Loading the CPU kernels' shared object, and choosing its instruction-set path.

The shared object `_ternary_cpu*.so` (ffi_handlers.cc and the headers beside it) is built by
setup.py at `pip install` time. Nothing is loaded when bitnet_jax is imported: the first
`available()` call loads it with ctypes, checks its ABI and the jaxlib it was built against, and
registers its four XLA FFI targets for the CPU platform. When it cannot be loaded (not built, no
compiler at install time, unsupported platform, BITNET_JAX_DISABLE_FFI set) `available()` is
False, `unavailable_reason()` says why, and one RuntimeWarning names the reason; ffi.py then
computes the matmuls through the XLA path.

Kernel paths ("ISAs", isa.h): "scalar" (portable C++), "avx2", "avxvnni", "avx512vnni", "amx"
(avx512vnni plus AMX-INT8 tiles for the packed GEMM, Sapphire Rapids and later). The best
one this CPU supports is chosen at load time, or the one named by the environment variable
BITNET_JAX_CPU_ISA; `set_isa` changes it for every later call (tests, benchmarks). Within a path
the C++ picks the kernel by the number of tokens M: the GEMV for M = 1, and on "avx512vnni" the
GEMMs of ternary_gemm.h / int8_gemm.h for M >= 2; "amx" runs those too, except the packed GEMM
from 16 tokens (ternary_amx.h).
"""

from __future__ import annotations

import ctypes
import os
import sysconfig
import threading
import warnings
from pathlib import Path

import jax
import jaxlib

from bitnet_jax.errors import KernelError

TARGET = "bitnet_ternary_matmul"
LINEAR_TARGET = "bitnet_ternary_linear"
INT8_TARGET = "bitnet_int8_matmul"
ATTENTION_TARGET = "bitnet_attention"
GREEDY_TARGET = "bitnet_greedy"
INT8_LINEAR_TARGET = "bitnet_int8_linear"
QUANTIZE_KV_TARGET = "bitnet_quantize_kv"
HALF_LINEAR_TARGET = "bitnet_half_linear"
ABI_VERSION = 8
ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni", "amx")  # isa.h `Isa`, best last
DISABLE_ENV = "BITNET_JAX_DISABLE_FFI"

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "reason": None, "warned": False, "registered": False}


def _library_path() -> Path:
    """The built extension beside this file (setup.py names it _ternary_cpu<EXT_SUFFIX>)."""
    here = Path(__file__).resolve().parent
    own = here / ("_ternary_cpu" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
    if own.is_file():
        return own
    # Any other build works too: the library does not link against Python.
    found = sorted(here.glob("_ternary_cpu*.so")) + sorted(here.glob("_ternary_cpu*.dylib"))
    if not found:
        raise OSError(
            f"the extension _ternary_cpu*.so is not in {here}; it is built by "
            "`pip install .` (or `pip install -e .`) with a C++17 compiler and jaxlib's FFI headers"
        )
    return found[0]


def _version_tuple(version: str) -> tuple[int, ...]:
    """Parse "0.10.2" as (0, 10, 2); stops at a non-numeric part ("0.11.0rc1": (0, 11))."""
    parts = []
    for piece in version.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def _load_library() -> ctypes.CDLL:
    """Load the shared object, check its ABI and register the FFI targets (once per process)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        raise OSError(f"{DISABLE_ENV} is set")
    lib = ctypes.CDLL(str(_library_path()))
    lib.bitnet_ternary_abi_version.restype = ctypes.c_int
    version = lib.bitnet_ternary_abi_version()
    if version != ABI_VERSION:
        raise OSError(
            f"the extension has ABI version {version}, this package expects {ABI_VERSION}; "
            "reinstall bitnet_jax to rebuild it"
        )
    lib.bitnet_ternary_built_jaxlib.restype = ctypes.c_char_p
    built = lib.bitnet_ternary_built_jaxlib().decode()
    if built != "unknown" and _version_tuple(built) > _version_tuple(jaxlib.__version__):
        raise OSError(
            f"the extension was built against jaxlib {built} but jaxlib "
            f"{jaxlib.__version__} is running, and XLA only accepts FFI handlers from the same "
            "or older headers; reinstall bitnet_jax in this environment"
        )
    for name in ("bitnet_ternary_get_isa", "bitnet_ternary_set_isa", "bitnet_ternary_best_isa",
                 "bitnet_ternary_isa_supported"):
        getattr(lib, name).restype = ctypes.c_int
    lib.bitnet_ternary_set_isa.argtypes = [ctypes.c_int]
    lib.bitnet_ternary_isa_supported.argtypes = [ctypes.c_int]
    if not _state["registered"]:
        for target, symbol in ((TARGET, lib.BitnetTernaryMatmul),
                               (LINEAR_TARGET, lib.BitnetTernaryLinear),
                               (INT8_TARGET, lib.BitnetInt8Matmul),
                               (ATTENTION_TARGET, lib.BitnetAttention),
                               (GREEDY_TARGET, lib.BitnetGreedy),
                               (INT8_LINEAR_TARGET, lib.BitnetInt8Linear),
                               (QUANTIZE_KV_TARGET, lib.BitnetQuantizeKv),
                               (HALF_LINEAR_TARGET, lib.BitnetHalfLinear)):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
        _state["registered"] = True
    return lib


def _lib():
    """The loaded library or None; the first call loads it and warns once on failure."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                _state["lib"] = _load_library()
            except Exception as e:  # noqa: BLE001 - any failure means "use XLA", never a crash
                _state["reason"] = f"{type(e).__name__}: {e}"
        if _state["lib"] is None and not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                "bitnet_jax CPU FFI kernel unavailable, using the XLA int8 path instead "
                f"({_state['reason']}).",
                RuntimeWarning,
                stacklevel=3,
            )
        return _state["lib"]


def available() -> bool:
    """True if the CPU kernels are built and loaded (loads them on first call)."""
    return _lib() is not None


def unavailable_reason() -> str | None:
    """Why the kernels could not be loaded, or None if they are available (or not tried yet)."""
    return _state["reason"]


def require_library() -> ctypes.CDLL:
    """The loaded library; raises KernelError (with the reason) if it is not available."""
    lib = _lib()
    if lib is None:
        raise KernelError(
            f"The CPU FFI kernel is not available ({_state['reason']}); reinstall bitnet_jax "
            "with a C++ compiler, or use kernel='xla'."
        )
    return lib


def isa() -> str:
    """Name of the kernel path in use: "scalar", "avx2", "avxvnni", "avx512vnni" or "amx"."""
    return ISAS[require_library().bitnet_ternary_get_isa()]


def supported_isas() -> tuple[str, ...]:
    """Kernel paths this CPU can run, best last."""
    lib = require_library()
    return tuple(n for k, n in enumerate(ISAS) if lib.bitnet_ternary_isa_supported(k))


def set_isa(name: str) -> str:
    """Select a kernel path for every later call (tests, benchmarks); returns the previous one.

    The environment variable BITNET_JAX_CPU_ISA sets the initial path the same way.
    """
    lib = require_library()
    if name not in ISAS or not lib.bitnet_ternary_isa_supported(ISAS.index(name)):
        raise KernelError(
            f"CPU kernel path {name!r} is not supported on this machine; use one of "
            f"{supported_isas()}."
        )
    previous = ISAS[lib.bitnet_ternary_get_isa()]
    lib.bitnet_ternary_set_isa(ISAS.index(name))
    return previous
