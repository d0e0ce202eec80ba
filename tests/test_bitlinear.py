"""BitLinear: quantisers, 2-bit packing, the packed and latent products (bitnet_jax/bitlinear.py).

The NumPy references below are rewrites of bitnet-spec §1.1 and §1.3, not of our code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.model.bitlinear import bitlinear
from bitnet_jax.quant import (fake_quantize_activations, is_packed, pack_ternary, pack_ternary_np,
                              pack_weights, quantize_activations, quantize_weights,
                              unpack_ternary, unpack_ternary_np, unpack_weights)
from bitnet_jax.kernels.xla import ternary_matmul_xla
from bitnet_jax.model.policy import Policy
from conftest import LEAF_TOL

F32 = Policy()


def np_quantize_weights(w):
    """spec §1.1: γ = max(mean|W|, 1e-5), t = clip(round(W/γ), -1, 1) per matrix."""
    w = np.asarray(w, np.float32)
    gamma = np.maximum(np.abs(w).mean(axis=(-2, -1), dtype=np.float64), 1e-5).astype(np.float32)
    t = np.clip(np.round(w / gamma[..., None, None]), -1, 1).astype(np.int8)
    return t, gamma


def np_quantize_activations(x):
    """spec §1.1: s = 127 / max(max|x|, 1e-5), x_q = clip(round(x·s), -128, 127) per row."""
    x = np.asarray(x, np.float32)
    absmax = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-5))
    x_q = np.clip(np.round(x * (np.float32(127.0) / absmax)), -128, 127).astype(np.int8)
    return x_q, absmax / np.float32(127.0)


def np_bitlinear(x, t, gamma):
    """y = (x_q · tᵀ) · step · γ with the integer product computed exactly."""
    x_q, step = np_quantize_activations(x)
    acc = x_q.astype(np.int64) @ t.astype(np.int64).T
    return (acc.astype(np.float64) * step * gamma).astype(np.float32)


# ---- quantisers ---------------------------------------------------------------------------------


def test_quantize_weights_matches_numpy(rng):
    w = rng.normal(0, 0.7, size=(3, 12, 20)).astype(np.float32)  # [L, O, I]: one γ per matrix
    t, scale = quantize_weights(jnp.asarray(w))
    t_ref, g_ref = np_quantize_weights(w)
    assert t.dtype == jnp.int8 and t.shape == w.shape and scale.shape == (3,)
    np.testing.assert_allclose(np.asarray(scale), g_ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(t), t_ref)
    assert set(np.unique(np.asarray(t))) <= {-1, 0, 1}


def test_quantize_weights_hand_worked():
    # mean|W| = (0.5 + 1.5 + 0.1 + 2.0) / 4 = 1.025; W/γ = [0.49, -1.46, 0.10, 1.95].
    w = jnp.asarray([[0.5, -1.5], [0.1, 2.0]], jnp.float32)
    t, scale = quantize_weights(w)
    assert np.asarray(t).tolist() == [[0, -1], [0, 1]]
    assert float(scale) == pytest.approx(1.025, rel=1e-6)
    t0, s0 = quantize_weights(jnp.zeros((4, 3)))  # all-zero weight: γ clamps to 1e-5, t = 0
    assert float(s0) == pytest.approx(1e-5) and not np.asarray(t0).any()


def test_quantize_activations_matches_numpy(rng):
    x = rng.normal(0, 2.0, size=(3, 7, 33)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero row: the 1e-5 clamp keeps the step finite
    x_q, step = quantize_activations(jnp.asarray(x))
    x_q_ref, step_ref = np_quantize_activations(x)
    assert x_q.dtype == jnp.int8 and step.shape == (3, 7, 1) and step.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(x_q), x_q_ref)
    np.testing.assert_allclose(np.asarray(step), step_ref, rtol=3e-7)
    assert not np.asarray(x_q)[0, 0].any()
    assert np.asarray(x_q).min() >= -127  # |x| <= max, so -128 never occurs (spec §1.1)


def test_quantize_activations_rounds_half_to_even():
    # max|x| = 127 makes s_x = 1, so x·s_x hits the ties exactly.
    x = jnp.asarray([[0.5, 1.5, 2.5, -2.5, -0.5, 127.0]], jnp.float32)
    x_q, step = quantize_activations(x)
    assert np.asarray(x_q).tolist() == [[0, 2, 2, -2, 0, 127]]
    assert float(step[0, 0]) == 1.0


def test_fake_quantizers_have_straight_through_gradients(rng):
    x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    t, gamma = quantize_weights(w)
    w_q = t.astype(jnp.float32) * gamma
    x_fq = fake_quantize_activations(x)

    def loss_bitlinear(x, w):
        return jnp.sum(bitlinear(x, w, F32) * g)

    def loss_plain(x, w):  # the plain linear layer on the already-quantised operands
        return jnp.sum((x @ w.T) * g)

    gx, gw = jax.jit(jax.grad(loss_bitlinear, argnums=(0, 1)))(x, w)
    gx_ref, gw_ref = jax.jit(jax.grad(loss_plain, argnums=(0, 1)))(x_fq, w_q)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(gw_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-6, atol=1e-6)
    # Forward values are the fake-quantised ones.
    np.testing.assert_allclose(np.asarray(bitlinear(x, w, F32)), np.asarray(x_fq @ w_q.T),
                               rtol=1e-6, atol=1e-6)


# ---- packing ------------------------------------------------------------------------------------

# transformers' `unpack_weights` docstring example (spec §1.3): packed row r, bits 2i..2i+1 hold
# original row r + i·O/4 as code t+1.
HF_PACKED = [[0b10100001, 0b00011000],
             [0b10010000, 0b00001010]]
HF_UNPACKED = [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]


def test_unpack_hand_worked_hf_docstring_example():
    packed = jnp.asarray(HF_PACKED, jnp.uint8)
    assert np.asarray(unpack_ternary(packed)).tolist() == HF_UNPACKED
    assert np.asarray(pack_ternary(jnp.asarray(HF_UNPACKED, jnp.int8))).tolist() == HF_PACKED
    assert unpack_ternary_np(np.asarray(HF_PACKED, np.uint8)).tolist() == HF_UNPACKED
    assert pack_ternary_np(np.asarray(HF_UNPACKED, np.int8)).tolist() == HF_PACKED


def test_pack_bit_layout_single_values():
    # One +1 at original row 5 of O=8 (R = 2): packed row 5 % 2 = 1, plane 5 // 2 = 2, code 2 at
    # bits 4..5; every other weight is 0 (code 1).
    t = np.zeros((8, 1), np.int8)
    t[5, 0] = 1
    packed = np.asarray(pack_ternary(jnp.asarray(t)))
    assert packed[:, 0].tolist() == [0b01010101, 0b01100101]


@pytest.mark.parametrize("shape", [(4, 1), (12, 20), (3, 8, 5)])
def test_pack_unpack_roundtrip(rng, shape):
    t = rng.integers(-1, 2, size=shape).astype(np.int8)
    packed = pack_ternary(jnp.asarray(t))
    assert packed.dtype == jnp.uint8 and packed.shape == (*shape[:-2], shape[-2] // 4, shape[-1])
    np.testing.assert_array_equal(np.asarray(unpack_ternary(packed)), t)
    if len(shape) == 2:  # the NumPy copies in checkpoint.py use the same layout
        np.testing.assert_array_equal(pack_ternary_np(t), np.asarray(packed))
        np.testing.assert_array_equal(unpack_ternary_np(np.asarray(packed)), t)


def test_unpack_of_any_byte_then_pack_is_identity_except_code3(rng):
    packed = rng.integers(0, 256, size=(6, 9)).astype(np.uint8)
    t = np.asarray(unpack_ternary(jnp.asarray(packed)))
    assert set(np.unique(t)) <= {-1, 0, 1}
    # Code 3 never occurs in valid data and is read as 0 (llama.cpp's choice, spec §1.3).
    codes = np.stack([(packed >> (2 * i)) & 3 for i in range(4)])  # [4, R, I]
    repacked = np.asarray(pack_ternary(jnp.asarray(t)))
    fixed = np.where(codes == 3, 1, codes)
    want = fixed[0] | fixed[1] << 2 | fixed[2] << 4 | fixed[3] << 6
    np.testing.assert_array_equal(repacked, want)


def test_pack_needs_output_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(jnp.zeros((6, 3), jnp.int8))


def test_pack_weights_leaf(rng):
    w = jnp.asarray(rng.normal(size=(2, 8, 6)), jnp.float32)
    leaf = pack_weights(w)
    assert is_packed(leaf) and not is_packed(w)
    assert leaf["packed"].shape == (2, 2, 6) and leaf["scale"].shape == (2,)
    t, gamma = quantize_weights(w)
    np.testing.assert_array_equal(np.asarray(unpack_weights(leaf)),
                                  np.asarray(t.astype(jnp.float32) * gamma[:, None, None]))


# ---- the products -------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 5])
def test_ternary_matmul_xla_is_exact(rng, m):
    x_q = rng.integers(-127, 128, size=(m, 40)).astype(np.int8)
    t = rng.integers(-1, 2, size=(12, 40)).astype(np.int8)
    acc = ternary_matmul_xla(jnp.asarray(x_q), pack_ternary(jnp.asarray(t)))
    assert acc.dtype == jnp.int32 and acc.shape == (m, 12)
    np.testing.assert_array_equal(np.asarray(acc), x_q.astype(np.int64) @ t.astype(np.int64).T)


@pytest.mark.parametrize("lead", [(1,), (3, 7)])
def test_packed_bitlinear_matches_numpy_formula(rng, lead):
    x = rng.normal(0, 1.5, size=(*lead, 32)).astype(np.float32)
    w = rng.normal(0, 0.3, size=(48, 32)).astype(np.float32)
    leaf = pack_weights(jnp.asarray(w))
    y = bitlinear(jnp.asarray(x), leaf, F32)
    t, gamma = np_quantize_weights(w)
    assert y.shape == (*lead, 48) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np_bitlinear(x, t, float(leaf["scale"])),
                               rtol=1e-6, atol=LEAF_TOL)


def test_packed_equals_latent_bitlinear(rng):
    # Same weights, same input: identical int8 activations and ternary codes, so the two paths
    # differ only by float summation order (int32 accumulate vs f32 dot): within 1e-6.
    x = jnp.asarray(rng.normal(0, 1.5, size=(3, 7, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 0.3, size=(48, 32)), jnp.float32)
    y_latent = bitlinear(x, w, F32)
    y_packed = bitlinear(x, pack_weights(w), F32)
    np.testing.assert_allclose(np.asarray(y_packed), np.asarray(y_latent), rtol=1e-6, atol=1e-6)


def test_unquantized_bitlinear_is_a_plain_linear(rng):
    x = rng.normal(size=(3, 7, 32)).astype(np.float32)
    w = rng.normal(size=(48, 32)).astype(np.float32)
    y = bitlinear(jnp.asarray(x), jnp.asarray(w), F32, quantized=False)
    np.testing.assert_allclose(np.asarray(y), x @ w.T, rtol=1e-5, atol=LEAF_TOL)


def test_bitlinear_respects_the_compute_dtype(rng):
    policy = Policy("bfloat16", "bfloat16", "float32")
    x = jnp.asarray(rng.normal(size=(2, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
    shapes = [jax.eval_shape(lambda x, w: bitlinear(x, w, policy), x, leaf)
              for leaf in (pack_weights(w), w)]
    assert [s.dtype for s in shapes] == [jnp.bfloat16, jnp.bfloat16]
