"""The one place that chooses a kernel: "xla", "ffi" (CPU) or "pallas" (GPU).

`ternary_matmul(x_q [M, I] int8, packed [O/4, I] uint8) -> [M, O] int32` is exact, so every
implementation must agree bit for bit with `ternary_matmul_xla` (parity tests in tests/).
`packed` may also be the stacked [L, O/4, I] weights of all layers with a `layer` index; the CPU
kernel reads that matrix in place, the others slice it first. `int8_matmul` is the int8 LM head
([M, I] x [V, I] int8 -> [M, V] int32), through the CPU kernel or XLA's int8 dot.
`attention_kernel` says whether cached attention runs the CPU kernel (cpu/attention_cpu.h).

The implementation is chosen at trace time by `choose_kernel` from a policy's `kernel`:

  "xla"     in-graph unpack + int8 dot (portable reference)
  "ffi"     packed CPU kernel through jax.ffi (AVX-512/VNNI, AVX2 or portable C++)
  "pallas"  Pallas GPU kernel
  "auto"    ffi on CPU when the extension loads, pallas on GPU, xla otherwise
"""

from __future__ import annotations

import jax

from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.kernels.xla import int8_matmul_xla, ternary_matmul_xla

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def choose_kernel(kernel: str = "auto", platform: str | None = None) -> str:
    """Resolve a policy's `kernel` to "xla", "ffi" or "pallas" for `platform`.

    Args:
      kernel: "auto", "xla", "ffi" or "pallas".
      platform: "cpu", "gpu", "cuda", "rocm", ... (default: JAX's default backend).
    """
    if kernel != "auto":
        return kernel
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "ffi" if cpu_ffi.available() else "xla"
    if platform in GPU_PLATFORMS:
        return "pallas" if _pallas_importable() else "xla"
    return "xla"


def _pallas_importable() -> bool:
    try:
        # Deferred: Pallas pulls in jax.experimental's GPU lowering, only needed on a GPU.
        from bitnet_jax.kernels.gpu import pallas  # noqa: F401
    except ImportError:
        return False
    return True


def ternary_matmul(x_q: jax.Array, packed: jax.Array, kernel: str = "auto",
                   layer=None) -> jax.Array:
    """Dispatch [M, I] int8 x packed [O/4, I] -> [M, O] int32 to the chosen implementation.

    With `layer` (int32 scalar), `packed` is [L, O/4, I] and matrix `layer` is used.
    """
    kernel = choose_kernel(kernel)
    if kernel == "ffi":
        return cpu_ffi.ternary_matmul_ffi(x_q, packed, layer)
    if layer is not None:
        packed = jax.lax.dynamic_index_in_dim(packed, layer, 0, keepdims=False)
    if kernel == "pallas":
        # Deferred: see _pallas_importable.
        from bitnet_jax.kernels.gpu import pallas

        return pallas.ternary_matmul_pallas(x_q, packed)
    return ternary_matmul_xla(x_q, packed)


def ternary_matmul_many(x_q: jax.Array, packed: list, kernel: str = "auto",
                        layer=None) -> list:
    """`ternary_matmul` for several weights sharing x_q; the CPU kernel does them in one call."""
    kernel = choose_kernel(kernel)
    if kernel == "ffi":
        return cpu_ffi.ternary_matmul_many_ffi(x_q, packed, layer)
    return [ternary_matmul(x_q, w, kernel, layer) for w in packed]


def int8_matmul(x_q: jax.Array, w: jax.Array, kernel: str = "auto") -> jax.Array:
    """[M, I] int8 x [V, I] int8 -> [M, V] int32: the CPU kernel for "ffi" (and "auto" on CPU),
    XLA's int8 dot otherwise."""
    if choose_kernel(kernel) == "ffi":
        return cpu_ffi.int8_matmul_ffi(x_q, w)
    return int8_matmul_xla(x_q, w)


def attention_kernel(kernel: str, q: jax.Array, cache_k: jax.Array) -> str:
    """"ffi" if cached attention should run the CPU kernel (cpu/attention_cpu.h), else "xla"."""
    if choose_kernel(kernel) != "ffi":
        return "xla"
    return "ffi" if cpu_ffi.attention_usable(q, cache_k) else "xla"


def cached_attention_ffi(q, cache_k, cache_v, layer, rows, pos) -> jax.Array:
    """The CPU attention kernel over one layer of the stacked cache, in place (cpu/ffi.py).

    q [Bq, T, N, H]; caches [L, B, K, S, H]; layer int32 []; rows, pos int32 [Bq]: query t of
    row i sits at position pos[i] + t of cache row rows[i] and sees its positions 0..pos[i] + t.
    """
    return cpu_ffi.attention_ffi(q, cache_k, cache_v, layer, rows, pos)
