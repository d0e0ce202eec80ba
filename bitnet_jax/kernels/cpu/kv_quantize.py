"""`quantize_kv_ffi`: keys and values as the int8 KV cache's rows in one CPU kernel call.

model/cache.quantize_rows is the reference: per row of H floats, H int8 codes of the row's absmax
and its float32 scale as 4 bytes. XLA:CPU runs it as ~6 small fusions per layer (the reduce,
the rounding, the scale's bytes and the concatenation; ~1.5-1.9 ms of a batch-8 decode step of
the large shape, benchmarks/README.md); the kernel (kv_quantize_cpu.h) writes the same bytes:
exact, tests/test_attention.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax.errors import KernelError
from bitnet_jax.kernels.cpu.library import QUANTIZE_KV_TARGET, require_library


def quantize_kv_ffi(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 rows of k and v.

    Args:
      k, v: [..., H] float32 (the same shape), e.g. a call's new keys/values [Bq, K, T, H].

    Returns:
      (k8, v8) [..., H + 4] int8: each row's codes, then its float32 scale (model/cache.py).
    """
    if k.shape != v.shape or k.ndim < 1 or k.shape[-1] == 0:
        raise KernelError(f"quantize_kv_ffi needs k and v of one shape [..., H]; got {k.shape} "
                          f"and {v.shape}.")
    require_library()
    row = jax.ShapeDtypeStruct((*k.shape[:-1], k.shape[-1] + 4), jnp.int8)
    call = jax.ffi.ffi_call(QUANTIZE_KV_TARGET, (row, row), vmap_method="sequential")
    return call(k.astype(jnp.float32), v.astype(jnp.float32))
