"""BitLinear: ternary weights with one scale per matrix, int8 activations per token.

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
           (kernels/ternary_cpu.h) relies on its absence to extract the planes with one shift.
           This is also the kernel's layout for GGUF TQ2_0/TQ1_0/I2_S files, which are
           repacked into it at load from their 2-bit codes (gguf/load.py), no float copy.

When the model is a plain float Llama (`cfg.quant_method is None`) a float leaf is used as an
ordinary linear weight with no quantisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax import kernels
from bitnet_jax.policy import Policy

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
# The linear layer


def bitlinear(x: jax.Array, w, policy: Policy, quantized: bool = True) -> jax.Array:
    """Apply one BitLinear (or plain linear) projection.

    Args:
      x: [..., I] activations in the compute dtype.
      w: a latent float weight [O, I] or a packed leaf {"packed": [O/4, I], "scale": []}; in
        model.apply's layer scan the leaf is {"packed": [L, O/4, I], "layer": l, "scale": []}
        and matrix l of the stack is used (read in place by the CPU kernel).
      policy: precision policy; `policy.kernel` picks the packed matmul implementation.
      quantized: False for plain float Llama models (latent leaf used as is).

    Returns:
      [..., O] in the compute dtype.
    """
    if is_packed(w):
        return bitlinear_many(x, [w], policy)[0]
    if not quantized:
        y = jnp.einsum("...i,oi->...o", x.astype(policy.compute), w.astype(policy.compute),
                       preferred_element_type=jnp.float32)
        return y.astype(policy.compute)
    xq = fake_quantize_activations(x).astype(policy.compute)
    wq = fake_quantize_weights(w).astype(policy.compute)
    y = jnp.einsum("...i,oi->...o", xq, wq, preferred_element_type=jnp.float32)
    return y.astype(policy.compute)


def bitlinear_many(x: jax.Array, ws: list, policy: Policy, quantized: bool = True) -> list:
    """`bitlinear` of one input through several projections (q/k/v, gate/up).

    With packed leaves the activations are quantised once and the CPU kernel computes every
    product in one call (one thread hand-off instead of one per projection).

    Args:
      x: [..., I] activations in the compute dtype.
      ws: BitLinear leaves, all with input size I.

    Returns:
      list of [..., O_j] in the compute dtype.
    """
    if not all(is_packed(w) for w in ws):
        return [bitlinear(x, w, policy, quantized) for w in ws]
    lead = x.shape[:-1]
    x_q, step = quantize_activations(x.reshape(-1, x.shape[-1]))  # [M, I] int8, [M, 1]
    layer = ws[0].get("layer")
    accs = kernels.ternary_matmul_many(x_q, [w["packed"] for w in ws], kernel=policy.kernel,
                                       layer=layer)  # int32 [M, O_j]
    out = []
    for acc, w in zip(accs, ws):
        y = acc.astype(jnp.float32) * (step * w["scale"].astype(jnp.float32))
        out.append(y.reshape(*lead, -1).astype(policy.compute))
    return out
