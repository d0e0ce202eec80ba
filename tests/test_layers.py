"""Leaf ops: RMSNorm, RoPE, FFN activations (bitnet_jax/layers.py) against NumPy rewrites."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.model.layers import activation, apply_rope, rms_norm, rope_frequencies
from bitnet_jax.formats.llama2c import interleaved_to_half
from conftest import LEAF_TOL


def np_rms_norm(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope_half(x, positions, theta):
    """Rotate-half RoPE (spec §1.2.1): pairs (i, i + H/2) turn by angle pos·θ^(-2i/H)."""
    h = x.shape[-1]
    inv = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)  # [H/2]
    ang = positions[..., None, None].astype(np.float64) * inv  # [B, T, 1, H/2]
    a, b = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)],
                          axis=-1)


def np_rope_interleaved(x, positions, theta):
    """llama2.c / Meta RoPE: pairs (2i, 2i+1) turn by angle pos·θ^(-2i/H)."""
    h = x.shape[-1]
    inv = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)
    ang = positions[..., None, None].astype(np.float64) * inv
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x, dtype=np.float64)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = b * np.cos(ang) + a * np.sin(ang)
    return out


def test_rms_norm_matches_numpy(rng):
    x = rng.normal(0, 3.0, size=(3, 7, 32)).astype(np.float32)
    w = rng.normal(1.0, 0.2, size=(32,)).astype(np.float32)
    y = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np_rms_norm(x, w, 1e-5), rtol=1e-6, atol=LEAF_TOL)


def test_rms_norm_eps_matters_for_small_inputs():
    x = jnp.full((1, 4), 1e-3, jnp.float32)
    y = rms_norm(x, jnp.ones(4), 1e-5)
    np.testing.assert_allclose(np.asarray(y), np_rms_norm(np.asarray(x), 1.0, 1e-5), rtol=1e-6)
    assert float(y[0, 0]) == pytest.approx(1e-3 / np.sqrt(1e-6 + 1e-5), rel=1e-5)


def test_rms_norm_bf16_keeps_dtype_with_f32_statistics(rng):
    # HF Llama: statistics in float32, cast back to the input dtype, then times the weight.
    x = rng.normal(0, 50.0, size=(5, 48)).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    w = jnp.asarray(rng.normal(1.0, 0.2, size=(48,)), jnp.bfloat16)
    y = rms_norm(xb, w, 1e-5)
    assert y.dtype == jnp.bfloat16
    x32 = np.asarray(xb.astype(jnp.float32))
    normed = jnp.asarray(x32 / np.sqrt(np.mean(x32 * x32, -1, keepdims=True) + 1e-5),
                         jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(w * normed, np.float32))


def test_rope_frequencies_match_numpy():
    pos = jnp.asarray([[0, 1, 5], [2, 3, 100]], jnp.int32)
    cos, sin = rope_frequencies(pos, 8, 10000.0)
    assert cos.shape == (2, 3, 8) and cos.dtype == jnp.float32
    inv = 10000.0 ** (-np.arange(0, 8, 2) / 8)
    ang = np.asarray(pos)[..., None] * np.concatenate([inv, inv])
    np.testing.assert_allclose(np.asarray(cos), np.cos(ang), atol=LEAF_TOL)
    np.testing.assert_allclose(np.asarray(sin), np.sin(ang), atol=LEAF_TOL)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_apply_rope_matches_numpy_rotate_half(rng, theta):
    x = rng.normal(size=(3, 7, 4, 8)).astype(np.float32)  # [B, T, N, H]
    pos = rng.integers(0, 60, size=(3, 7))
    cos, sin = rope_frequencies(jnp.asarray(pos), 8, theta)
    y = apply_rope(jnp.asarray(x), cos, sin)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np_rope_half(x, pos, theta), atol=LEAF_TOL)
    # A rotation: norms of each (i, i + H/2) pair are kept; position 0 is the identity.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1),
                               np.linalg.norm(x, axis=-1), rtol=1e-5)
    zero = rope_frequencies(jnp.zeros((3, 7), jnp.int32), 8, theta)
    np.testing.assert_array_equal(np.asarray(apply_rope(jnp.asarray(x), *zero)), x)


def test_rotate_half_equals_interleaved_after_row_permutation(rng):
    # Why llama2.c / Meta q,k rows are permuted on conversion (HF convert_llama_weights_to_hf):
    # rotate-half RoPE of the permuted projection == permuted interleaved RoPE of the original.
    n, h, d = 4, 8, 32
    w = rng.normal(size=(n * h, d)).astype(np.float32)
    a = rng.normal(size=(2, 5, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(5), (2, 5))
    q_inter = np_rope_interleaved((a @ w.T).reshape(2, 5, n, h), pos, 10000.0)
    w_half = interleaved_to_half(w, n)
    cos, sin = rope_frequencies(jnp.asarray(pos), h, 10000.0)
    q_half = np.asarray(apply_rope(jnp.asarray((a @ w_half.T).reshape(2, 5, n, h)), cos, sin))
    # Head-wise, rotate-half slot j holds interleaved slot 2j (j < H/2) or 2(j - H/2) + 1.
    perm = np.concatenate([np.arange(0, h, 2), np.arange(1, h, 2)])
    np.testing.assert_allclose(q_half, q_inter[..., perm], atol=LEAF_TOL)
    # Dot products (what attention sees) are therefore identical.
    np.testing.assert_allclose(np.einsum("btnh,bsnh->bnts", q_half, q_half),
                               np.einsum("btnh,bsnh->bnts", q_inter, q_inter), atol=1e-4)


def test_interleaved_to_half_permutation_by_hand():
    w = np.arange(8, dtype=np.float32)[:, None]  # two heads of H=4, row index as the value
    assert interleaved_to_half(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    stacked = np.stack([w, w + 10])  # [L, N·H, D]
    assert interleaved_to_half(stacked, 2)[1, :, 0].tolist() == [10, 12, 11, 13, 14, 16, 15, 17]


def test_activations_match_numpy(rng):
    x = rng.normal(0, 3, size=(4, 48)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(activation("relu2", jnp.asarray(x))),
                               np.maximum(x, 0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(activation("silu", jnp.asarray(x))),
                               x / (1 + np.exp(-x)), rtol=1e-5, atol=1e-6)
