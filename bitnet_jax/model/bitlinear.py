"""BitLinear: one projection with ternary weights and int8 activations (formulas in quant.py).

A leaf is latent (float [O, I], fake-quantised with straight-through gradients for QAT) or
packed ({"packed": uint8 [O/4, I], "scale": f32}, inference); see quant.py for both forms. The
packed product runs through kernels.dispatch, which picks the XLA, CPU or GPU implementation.

When the model is a plain float Llama (`cfg.quant_method is None`) a float leaf is used as an
ordinary linear weight with no quantisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax import kernels
from bitnet_jax.quant import (dequantize_products, fake_quantize_activations,
                              fake_quantize_weights, is_packed, quantize_activations)
from bitnet_jax.model.policy import Policy

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
    product in one call (one thread hand-off instead of one per projection). On one CPU device
    that call also quantises x and scales the products (kernels.ternary_linear_many): no XLA op
    runs between the input and the float outputs.

    Args:
      x: [..., I] activations in the compute dtype.
      ws: BitLinear leaves, all with input size I.

    Returns:
      list of [..., O_j] in the compute dtype.
    """
    if not all(is_packed(w) for w in ws):
        return [bitlinear(x, w, policy, quantized) for w in ws]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, I]
    layer = ws[0].get("layer")
    packed = [w["packed"] for w in ws]
    if kernels.linear_fusable(policy.kernel, x2, packed, layer):
        # CPU: quantise, matmul and scale in one kernel call (same numbers, no XLA glue).
        scales = [w.get("scales", w["scale"]) for w in ws]  # [L] in the layer scan (stacked.py)
        ys = kernels.ternary_linear_many(x2, packed, scales, layer)
        return [y.reshape(*lead, -1).astype(policy.compute) for y in ys]
    x_q, step = quantize_activations(x2)  # [M, I] int8, [M, 1]
    accs = kernels.ternary_matmul_many(x_q, packed, kernel=policy.kernel,
                                       layer=layer)  # int32 [M, O_j]
    out = []
    for acc, w in zip(accs, ws):
        y = dequantize_products(acc, step, w["scale"])
        out.append(y.reshape(*lead, -1).astype(policy.compute))
    return out
