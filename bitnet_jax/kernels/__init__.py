"""Ternary matmul kernels behind one signature.

`ternary_matmul(x_q [M, I] int8, packed [O/4, I] uint8) -> [M, O] int32` is exact, so every
implementation must agree bit for bit with `ternary_matmul_xla` (parity tests in tests/).
The implementation is chosen at trace time from `kernel`:

  "xla"     in-graph unpack + int8 dot (portable reference)
  "ffi"     packed CPU kernel through jax.ffi (AVX-512/VNNI, AVX2 or portable C++)
  "pallas"  Pallas GPU kernel
  "auto"    ffi on CPU when the extension loads, pallas on GPU, xla otherwise
"""

from __future__ import annotations

import jax

from bitnet_jax.kernels.xla import ternary_matmul_xla


def _default_platform() -> str:
    return jax.default_backend()


def ternary_matmul(x_q: jax.Array, packed: jax.Array, kernel: str = "auto") -> jax.Array:
    """Dispatch [M, I] int8 x packed [O/4, I] -> [M, O] int32 to the chosen implementation."""
    if kernel == "auto":
        kernel = _auto_kernel()
    if kernel == "ffi":
        from bitnet_jax.kernels import cpu_ffi

        return cpu_ffi.ternary_matmul_ffi(x_q, packed)
    if kernel == "pallas":
        from bitnet_jax.kernels import pallas_gpu

        return pallas_gpu.ternary_matmul_pallas(x_q, packed)
    return ternary_matmul_xla(x_q, packed)


def _auto_kernel(platform: str | None = None) -> str:
    """The "auto" choice for `platform` (default: JAX's default backend)."""
    platform = platform or _default_platform()
    if platform == "cpu":
        try:
            from bitnet_jax.kernels import cpu_ffi
        except ImportError:
            return "xla"
        return "ffi" if cpu_ffi.available() else "xla"
    if platform in ("gpu", "cuda", "rocm"):
        try:
            from bitnet_jax.kernels import pallas_gpu  # noqa: F401
        except ImportError:
            return "xla"
        return "pallas"
    return "xla"
