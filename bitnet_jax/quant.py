"""Every ternary and int8 formula of BitNet b1.58, in JAX and numpy twins, in one place.

The math every published BitNet b1.58 model shares (bitnet-spec §1.1):

  weights (absmean, per matrix):   γ = max(mean|W|, 1e-5),  t = clip(round(W/γ), -1, 1),  W ≈ t·γ
  activations (absmax, per token): s_x = 127 / max(max|x|, 1e-5),  x_q = clip(round(x·s_x), -128, 127)
  product:                         y = (x_q · tᵀ) · γ / s_x     (x_q · tᵀ exact in int32)

A BitLinear weight leaf takes one of two forms, told apart by structure at trace time:

  latent   float array [..., O, I]: master weights for QAT. The forward pass fake-quantises
           weights and activations with straight-through estimators (identity gradients).
  packed   {"packed": uint8 [..., O/4, I], "scale": f32 [...]}: inference form, 2 bits per weight.
           Packed row r holds original rows r + i·O/4 in bits 2i..2i+1 (i = 0..3) as the code
           t+1 ∈ {0,1,2}: exactly Hugging Face's `pack_weights` layout (spec §1.3), so HF packed
           checkpoints load without repacking. `scale` is the multiplier σ with W = σ·t.
           Code 3 is not a ternary value: every loader refuses it, and the CPU kernel
           (kernels/cpu/ternary_paths.h) relies on its absence to extract the planes with one
           shift. This is also the kernel's layout for GGUF TQ2_0/TQ1_0/I2_S files, which are
           repacked into it at load from their 2-bit codes (formats/gguf/load.py), no float copy.

The int8 LM head (model/params.quantize_lm_head) is a per-row absmax copy {"q8", "scale"}.

This module sits below model/, kernels/ and formats/ (all three use it) and imports none of the
package's other modules, so the packages stay one-way (README, Design).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WEIGHT_EPS = 1e-5
ACT_EPS = 1e-5


def is_packed(w) -> bool:
    """True if `w` is a packed BitLinear leaf ({"packed", "scale"})."""
    return isinstance(w, dict) and "packed" in w


# ------------------------------------------------------------------------------------------------
# Quantisers


def weight_scale(w: jax.Array) -> jax.Array:
    """Absmean scale γ = max(mean|W|, 1e-5) over the last two axes, float32 [...]."""
    w = w.astype(jnp.float32)
    return jnp.maximum(jnp.mean(jnp.abs(w), axis=(-2, -1)), WEIGHT_EPS)


def quantize_weights(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Ternarise a float weight with absmean scaling.

    Args:
      w: [..., O, I] float weight.

    Returns:
      t: [..., O, I] int8 in {-1, 0, 1}; scale: [...] float32 γ, so W ≈ t·γ.
    """
    scale = weight_scale(w)
    t = jnp.clip(jnp.round(w.astype(jnp.float32) / scale[..., None, None]), -1, 1)
    return t.astype(jnp.int8), scale


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token absmax int8 quantisation of the last axis.

    Args:
      x: [..., I] activations.

    Returns:
      x_q: [..., I] int8; x_scale: [..., 1] float32 dequantisation step max|x|/127,
      so x ≈ x_q · x_scale.
    """
    x = x.astype(jnp.float32)
    absmax = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), ACT_EPS)
    x_q = jnp.clip(jnp.round(x * (127.0 / absmax)), -128, 127).astype(jnp.int8)
    return x_q, absmax / 127.0


def dequantize_products(acc: jax.Array, step: jax.Array, scale: jax.Array) -> jax.Array:
    """BitLinear's output from its int32 products: acc [M, O] · (step [M, 1] · scale []) in
    float32 (the one form of it; the fused CPU kernel, cpu/quantize_cpu.h, matches XLA's)."""
    return acc.astype(jnp.float32) * (step * scale.astype(jnp.float32))


def fake_quantize_weights(w: jax.Array) -> jax.Array:
    """Absmean-ternarised weight t·γ in float32 with a straight-through gradient."""
    t, scale = quantize_weights(w)
    wq = t.astype(jnp.float32) * scale[..., None, None]
    w32 = w.astype(jnp.float32)
    return w32 + jax.lax.stop_gradient(wq - w32)


def fake_quantize_activations(x: jax.Array) -> jax.Array:
    """Per-token int8 fake quantisation (x_q·step) in float32 with a straight-through gradient."""
    x_q, step = quantize_activations(x)
    x32 = x.astype(jnp.float32)
    return x32 + jax.lax.stop_gradient(x_q.astype(jnp.float32) * step - x32)


# ------------------------------------------------------------------------------------------------
# 2-bit packing (Hugging Face layout, along the output axis)


def pack_ternary(t: jax.Array) -> jax.Array:
    """Pack ternary codes four to a byte along the output axis.

    Args:
      t: [..., O, I] integer array in {-1, 0, 1}; O must be a multiple of 4.

    Returns:
      [..., O/4, I] uint8; bits 2i..2i+1 of packed row r hold row r + i·O/4 as t+1.
    """
    *lead, o, i = t.shape
    if o % 4:
        raise ValueError(f"pack_ternary needs the output dim to be a multiple of 4, got {o}")
    codes = (t.astype(jnp.int32) + 1).astype(jnp.uint8).reshape(*lead, 4, o // 4, i)
    shifts = (2 * jnp.arange(4, dtype=jnp.uint8)).reshape(4, 1, 1)
    return _or4(codes << shifts)


def _or4(planes: jax.Array) -> jax.Array:
    return planes[..., 0, :, :] | planes[..., 1, :, :] | planes[..., 2, :, :] | planes[..., 3, :, :]


def unpack_ternary(packed: jax.Array) -> jax.Array:
    """Inverse of `pack_ternary`: [..., O/4, I] uint8 -> [..., O, I] int8 in {-1, 0, 1}.

    Code 3 never occurs in valid data (loaders refuse it); here it is mapped to 0, as
    llama.cpp does.
    """
    *lead, r, i = packed.shape
    shifts = (2 * jnp.arange(4, dtype=jnp.uint8)).reshape(4, 1, 1)
    codes = (packed[..., None, :, :] >> shifts) & jnp.uint8(3)  # [..., 4, O/4, I]
    t = codes.astype(jnp.int8) - jnp.int8(1)
    t = jnp.where(codes == 3, jnp.int8(0), t)
    return t.reshape(*lead, 4 * r, i)


def pack_weights(w: jax.Array) -> dict:
    """Ternarise a latent float weight and pack it: [..., O, I] -> {"packed", "scale"}."""
    t, scale = quantize_weights(w)
    return {"packed": pack_ternary(t), "scale": scale}


def unpack_weights(w: dict) -> jax.Array:
    """Effective float32 weight σ·t [..., O, I] of a packed leaf (for inspection and tests)."""
    return unpack_ternary(w["packed"]).astype(jnp.float32) * w["scale"][..., None, None]


# ------------------------------------------------------------------------------------------------
# Numpy twins for the loaders (no device, no float copy of a whole model)


def ternarize_np(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Absmean ternarisation in float32 numpy (the twin of quantize_weights)."""
    w = w.astype(np.float32)
    gamma = np.float32(max(float(np.mean(np.abs(w), dtype=np.float64)), 1e-5))
    t = np.clip(np.round(w / gamma), -1, 1).astype(np.int8)
    return t, gamma


def pack_ternary_np(t: np.ndarray) -> np.ndarray:
    """[O, I] int8 ternary -> [O/4, I] uint8 (the packed layout above)."""
    o = t.shape[0]
    codes = (t.astype(np.int16) + 1).astype(np.uint8).reshape(4, o // 4, *t.shape[1:])
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def unpack_ternary_np(packed: np.ndarray) -> np.ndarray:
    """[O/4, I] uint8 -> [O, I] int8 ternary (code 3 -> 0)."""
    planes = [(packed >> (2 * i)) & 3 for i in range(4)]
    codes = np.concatenate(planes, axis=0).astype(np.int8)
    return np.where(codes == 3, 0, codes - 1).astype(np.int8)


_INV127 = np.float32(1.0 / 127.0)


def row_int8_np(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numpy twin of `row_int8` for loaders (rows in chunks, no float copy of the table).

    Args:
      w: [R, D] rows of a float table.

    Returns:
      (q8 int8 [R, D], scale float32 [R]), bit-identical to `quantize_lm_head`.
    """
    w = np.asarray(w, np.float32)
    scale = np.maximum(np.max(np.abs(w), axis=-1), np.float32(1e-12)) * _INV127
    inv = (np.float32(1.0) / scale).astype(np.float32)
    q8 = np.clip(np.round(w * inv[:, None]), -127, 127).astype(np.int8)
    return q8, scale.astype(np.float32)


def row_int8(w: jax.Array) -> dict:
    w = w.astype(jnp.float32)
    # Multiply by 1/127 (not divide): XLA rewrites x/c as x·(1/c), so numpy does the same.
    scale = jnp.maximum(jnp.max(jnp.abs(w), axis=-1), 1e-12) * _INV127
    q8 = jnp.clip(jnp.round(w * (1.0 / scale)[:, None]), -127, 127).astype(jnp.int8)
    return {"q8": q8, "scale": scale}
