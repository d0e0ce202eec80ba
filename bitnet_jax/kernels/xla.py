"""The plain XLA ternary (and int8) matmul: the reference every custom kernel is tested against.

Unpacks the 2-bit codes in-graph and runs an int8 x int8 -> int32 dot. Facts measured on
XLA:CPU (jax-notes §2.3): the weight is kept [O, I] and both operands contract on their last
axis, and a single row is padded to two, because at M=1 XLA converts the whole weight to s32
(15-20x slower).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax.quant import unpack_ternary


def ternary_matmul_xla(x_q: jax.Array, packed: jax.Array) -> jax.Array:
    """Exact int32 product of int8 activations and packed ternary weights.

    Args:
      x_q: [M, I] int8 activations.
      packed: [O/4, I] uint8 codes in the quant.py layout.

    Returns:
      [M, O] int32 = x_q · tᵀ.
    """
    t = unpack_ternary(packed)  # [O, I] int8
    m = x_q.shape[0]
    if m == 1:
        x_q = jnp.concatenate([x_q, jnp.zeros_like(x_q)], axis=0)
    acc = jax.lax.dot_general(
        x_q, t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32
    )
    return acc[:m]


def int8_matmul_xla(x_q: jax.Array, w: jax.Array) -> jax.Array:
    """XLA's int8 dot [M, I] x [V, I] -> [M, V] int32 (one row padded to two, jax-notes §2.3)."""
    m = x_q.shape[0]
    if m == 1:
        x_q = jnp.concatenate([x_q, x_q], axis=0)
    return jax.lax.dot_general(x_q, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)[:m]
