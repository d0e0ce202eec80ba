"""`greedy_ffi`: the greedy next token of each row of logits in one CPU kernel call.

runtime/sampling.py's greedy choice is the argmax of the repetition-penalised logits, and the
engine also checks that every logit is finite. XLA:CPU runs the argmax as a variadic reduce
that is not vectorised (~0.5 ms for [8, 32002] on the Zen 3 of benchmarks/README.md, with the
select that penalises and the is-finite check ~0.9 ms of a 50 ms batch-8 decode step); the
kernel (greedy_cpu.h) does both in two vectorised passes over each row, with the same values:
exact, tests/test_sampling.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax.errors import KernelError
from bitnet_jax.kernels.cpu.library import GREEDY_TARGET, require_library


def greedy_ffi(logits: jax.Array, seen: jax.Array,
               penalty: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Argmax of the repetition-penalised logits, and whether each row is finite.

    Args:
      logits: [B, V] float32.
      seen: [B, V] bool, the tokens whose logit is penalised.
      penalty: [B] float32 > 0 (1 leaves the row as it is): a seen token's logit x becomes
        x / penalty if x > 0, else x * penalty (sampling.apply_repetition_penalty).

    Returns:
      (tokens [B] int32: the first maximum, or the first NaN as jnp.argmax; finite [B] bool:
      every logit of the row, before the penalty, is finite).
    """
    b, v = logits.shape if logits.ndim == 2 else (None, None)
    if logits.ndim != 2 or seen.shape != logits.shape or penalty.shape != (b,):
        raise KernelError(f"greedy_ffi needs logits [B, V], seen [B, V] and penalty [B]; got "
                          f"{logits.shape}, {seen.shape} and {penalty.shape}.")
    require_library()
    out = (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.bool_))
    call = jax.ffi.ffi_call(GREEDY_TARGET, out, vmap_method="sequential")
    return call(logits.astype(jnp.float32), seen.astype(jnp.bool_), penalty.astype(jnp.float32))
