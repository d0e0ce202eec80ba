"""The Flax NNX BitLinear layer (bitnet_jax/nnx.py) against bitlinear.bitlinear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bitnet_jax.model.bitlinear import bitlinear

from bitnet_jax.quant import unpack_weights, quantize_weights
from bitnet_jax.model.nnx import BitLinear
from bitnet_jax.model.policy import Policy

F32 = Policy()


def test_nnx_bitlinear_equals_bitlinear(rng):
    layer = BitLinear(32, 24, rngs=nnx.Rngs(0), policy=F32)
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    w = layer.weight[...]
    assert w.shape == (24, 32) and w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(bitlinear(x, w, F32)))
    # The packed export is the same ternary weight t·γ.
    t, gamma = quantize_weights(w)
    np.testing.assert_allclose(unpack_weights(layer.packed()), t * gamma, rtol=1e-6)


def test_nnx_bitlinear_trains(rng):
    layer = BitLinear(32, 24, rngs=nnx.Rngs(1), policy=F32, init_std=0.1)
    x = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)

    def loss(model):
        return jnp.mean((model(x) - target) ** 2)

    grads = nnx.grad(loss)(layer)
    want = jax.grad(lambda w: jnp.mean((bitlinear(x, w, F32) - target) ** 2))(layer.weight[...])
    np.testing.assert_allclose(grads.weight[...], want, rtol=1e-6, atol=1e-8)
    assert float(jnp.abs(want).max()) > 0

    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    before = float(loss(layer))
    for _ in range(20):
        optimizer.update(layer, nnx.grad(loss)(layer))
    assert float(loss(layer)) < before - 0.01
