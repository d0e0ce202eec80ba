"""Stateless leaf operations: RMSNorm, rotary position embedding, FFN activations.

All follow Hugging Face Llama numerics: RMSNorm computes in float32 and casts back before the
weight multiply; RoPE is the rotate-half (NEOX) form with pairs (i, i + H/2) and frequencies
θ^(-2i/H) (bitnet-spec §1.2.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x²) + eps) · weight, statistics in float32.

    Args:
      x: [..., D] activations.
      weight: [D] gain.
      eps: variance epsilon.

    Returns:
      [..., D] in x's dtype.
    """
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * normed


def rope_frequencies(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for rotate-half RoPE.

    Args:
      positions: [B, T] int32 absolute positions.
      head_dim: H.
      theta: base frequency.

    Returns:
      (cos, sin), each [B, T, H] float32 (the H/2 frequencies repeated twice, as HF does).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate q or k: x·cos + rotate_half(x)·sin.

    Args:
      x: [B, T, N, H] queries or keys.
      cos, sin: [B, T, H] float32 tables from `rope_frequencies`.

    Returns:
      [B, T, N, H] in x's dtype.
    """
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    """The FFN gate activation: "silu" (Llama, 1bitLLM) or "relu2" (2B4T: relu(x)²)."""
    if name == "relu2":
        r = jax.nn.relu(x)
        return r * r
    return jax.nn.silu(x)
