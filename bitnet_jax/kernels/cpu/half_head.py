"""`half_linear_ffi`: the float LM head from a float16 or bfloat16 table in one CPU call.

The loaders keep an embedding / LM head table that the file stores in 16 bits as it is under a
float32 policy (model/params.table_dtype): BitNet-2B4T's tied 128256 x 2560 table is 0.66 GB
so, 1.3 GB as float32. transformer.unembed's plain path widens the table in the dot, which
XLA:CPU does by writing a float32 copy of it in every call; this kernel (half_head_cpu.h)
widens each weight in registers and sums in float32: the same products as the plain path, in
another order (tests/test_half_head.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax.errors import KernelError
from bitnet_jax.kernels.cpu.library import HALF_LINEAR_TARGET, available, require_library

HALF_DTYPES = (jnp.float16, jnp.bfloat16)
# Most tokens per call: past that XLA's float32 GEMM on a widened copy is faster (2B4T's table,
# 2 threads, Xeon: M = 1 / 8 / 32 / 64 24 / 51 / 160 / 307 ms here, 49.5 / 98 / - / 196 ms for
# XLA's dot of a float32 table, before XLA's widening of the copy).
MAX_TOKENS = 32


def half_linear_usable(x: jax.Array, w: jax.Array) -> bool:
    """True if half_linear_ffi takes these operands here and pays: a float32 [M, D] x with M <=
    MAX_TOKENS (a decode step's or a prompt's last tokens), a float16 or bfloat16 [V, D] table,
    a CPU backend with the extension loaded."""
    return (x.ndim == 2 and w.ndim == 2 and x.shape[0] <= MAX_TOKENS and x.dtype == jnp.float32
            and w.dtype in HALF_DTYPES and jax.default_backend() == "cpu" and available())


def half_linear_ffi(x: jax.Array, w: jax.Array) -> jax.Array:
    """x · wᵀ in float32 with w widened exactly.

    Args:
      x: [M, D] float32 activations.
      w: [V, D] float16 or bfloat16 table.

    Returns:
      [M, V] float32 logits.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or w.dtype not in HALF_DTYPES:
        raise KernelError(f"half_linear needs x [M, D] and a float16 / bfloat16 w [V, D]; got "
                          f"{x.shape} and {w.shape} {w.dtype}.")
    require_library()
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(HALF_LINEAR_TARGET, out, vmap_method="sequential")
    return call(x.astype(jnp.float32), w)
