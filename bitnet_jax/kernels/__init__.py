"""Ternary matmul kernels behind one signature.

`ternary_matmul(x_q [M, I] int8, packed [O/4, I] uint8) -> [M, O] int32` is exact, so every
implementation must agree bit for bit with `ternary_matmul_xla` (parity tests in tests/).
`packed` may also be the stacked [L, O/4, I] weights of all layers with a `layer` index; the CPU
kernel reads that matrix in place, the others slice it first. `int8_matmul` is the int8 LM head
([M, I] x [V, I] int8 -> [M, V] int32), through the CPU kernel or XLA's int8 dot.
The implementation is chosen at trace time from `kernel`:

  "xla"     in-graph unpack + int8 dot (portable reference)
  "ffi"     packed CPU kernel through jax.ffi (AVX-512/VNNI, AVX2 or portable C++)
  "pallas"  Pallas GPU kernel
  "auto"    ffi on CPU when the extension loads, pallas on GPU, xla otherwise
"""

from __future__ import annotations

import jax

from bitnet_jax.kernels.xla import int8_matmul_xla, ternary_matmul_xla


def _default_platform() -> str:
    return jax.default_backend()


def ternary_matmul(x_q: jax.Array, packed: jax.Array, kernel: str = "auto",
                   layer=None) -> jax.Array:
    """Dispatch [M, I] int8 x packed [O/4, I] -> [M, O] int32 to the chosen implementation.

    With `layer` (int32 scalar), `packed` is [L, O/4, I] and matrix `layer` is used.
    """
    if kernel == "auto":
        kernel = _auto_kernel()
    if kernel == "ffi":
        from bitnet_jax.kernels import cpu_ffi

        return cpu_ffi.ternary_matmul_ffi(x_q, packed, layer)
    if layer is not None:
        packed = jax.lax.dynamic_index_in_dim(packed, layer, 0, keepdims=False)
    if kernel == "pallas":
        from bitnet_jax.kernels import pallas_gpu

        return pallas_gpu.ternary_matmul_pallas(x_q, packed)
    return ternary_matmul_xla(x_q, packed)


def ternary_matmul_many(x_q: jax.Array, packed: list, kernel: str = "auto",
                        layer=None) -> list:
    """`ternary_matmul` for several weights sharing x_q; the CPU kernel does them in one call."""
    if kernel == "auto":
        kernel = _auto_kernel()
    if kernel == "ffi":
        from bitnet_jax.kernels import cpu_ffi

        return cpu_ffi.ternary_matmul_many_ffi(x_q, packed, layer)
    return [ternary_matmul(x_q, w, kernel, layer) for w in packed]


def int8_matmul(x_q: jax.Array, w: jax.Array, kernel: str = "auto") -> jax.Array:
    """[M, I] int8 x [V, I] int8 -> [M, V] int32: the CPU kernel for "ffi" (and "auto" on CPU),
    XLA's int8 dot otherwise."""
    if kernel == "auto":
        kernel = _auto_kernel()
    if kernel == "ffi":
        from bitnet_jax.kernels import cpu_ffi

        return cpu_ffi.int8_matmul_ffi(x_q, w)
    return int8_matmul_xla(x_q, w)


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


def attention_kernel(kernel: str, q: jax.Array, cache_k: jax.Array) -> str:
    """"ffi" if cached attention should run the CPU kernel (attention_cpu.h), else "xla"."""
    if kernel == "auto":
        kernel = _auto_kernel()
    if kernel != "ffi":
        return "xla"
    from bitnet_jax.kernels import cpu_ffi

    return "ffi" if cpu_ffi.attention_usable(q, cache_k) else "xla"
