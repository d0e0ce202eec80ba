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
from bitnet_jax.model.layers import activation, rms_norm
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


def bitlinear_many(x: jax.Array, ws: list, policy: Policy, quantized: bool = True, *,
                   norm: jax.Array | None = None, eps: float = 1e-6,
                   residual: jax.Array | None = None, act: str | None = None) -> list:
    """`bitlinear` of one input through several projections (q/k/v, gate/up), with the layer's
    neighbours of the projection when asked.

    With packed leaves the activations are quantised once and the CPU kernel computes every
    product in one call (one thread hand-off instead of one per projection). On one CPU device
    that call also quantises x and scales the products (kernels.ternary_linear_many): no XLA op
    runs between the input and the float outputs; in float32 it also runs `norm`, `residual`
    and `act` (issue 16's per-layer glue, kernels/cpu/fused.py).

    Args:
      x: [..., I] activations in the compute dtype (the raw residual stream with `norm`).
      ws: BitLinear leaves, all with input size I.
      norm: None, or the gain [I] of an RMSNorm applied to x first (layers.rms_norm, eps); or
        the layer scan's whole stack [L, I] (`whole_norms`), of which gain ws[0]["layer"].
      residual: None or [..., O] (one leaf): the result is residual + the projection.
      act: None or the FFN activation's name (two leaves, gate and up): the result is
        act(gate) · up, computed in float32 (layers.activation).

    Returns:
      list of [..., O_j] in the compute dtype; one array with `residual` or `act`.
    """
    fused = _kernel_call(x, ws, policy, norm=norm, eps=eps, residual=residual, act=act)
    if fused is not None:
        return fused
    if norm is not None:
        if norm.ndim == 2:  # [L, I]: the gain of this layer
            norm = jax.lax.dynamic_index_in_dim(norm, ws[0]["layer"], 0, keepdims=False)
        x = rms_norm(x, norm, eps)
    ys = _projections(x, ws, policy, quantized)
    if act is not None:
        h = activation(act, ys[0].astype(jnp.float32)) * ys[1].astype(jnp.float32)
        return [h.astype(policy.compute)]
    if residual is not None:
        return [residual + ys[0]]
    return ys


# The per-layer RMSNorm gains, each the `norm` of one bitlinear_many call of model.block.
NORMS = ("input_layernorm", "post_attention_layernorm", "attn_sub_norm", "ffn_sub_norm")


def whole_norms(layers: dict, x: jax.Array, policy: Policy) -> tuple[str, ...]:
    """The norm gains the layer scan can hand whole ([L, I], kernels/stacked.py): all of NORMS
    where every packed projection of x is one CPU kernel call that also runs the norm and reads
    gain `layer` itself (`_kernel_call`: float32, the "ffi" kernel on one device), else none.
    A scan slice of each gain is one XLA op per norm and layer (~2-5 us on a CPU)."""
    leaves = jax.tree.leaves(layers, is_leaf=is_packed)
    packed = [w for w in leaves if is_packed(w)]
    latent = [w for w in leaves if not is_packed(w) and w.ndim >= 3]  # float [L, O, I] weights
    if not packed or latent or policy.compute != jnp.float32:
        return ()
    x2 = x.reshape(-1, x.shape[-1])
    if not kernels.linear_fusable(policy.kernel, x2, [w["packed"] for w in packed], 0):
        return ()
    return NORMS


def _kernel_call(x: jax.Array, ws: list, policy: Policy, **extras) -> list | None:
    """The projections (and `extras`: norm, eps, residual, act) as ONE CPU kernel call that
    also quantises x and scales the products (kernels.ternary_linear_many), or None where it
    does not apply: not all leaves packed, not the "ffi" kernel on one device, or extras with a
    compute dtype other than float32 (the kernel's float work is float32)."""
    if not all(is_packed(w) for w in ws):
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, I]
    layer = ws[0].get("layer")
    packed = [w["packed"] for w in ws]
    wants = any(v is not None for k, v in extras.items() if k != "eps")
    if (not kernels.linear_fusable(policy.kernel, x2, packed, layer)
            or (wants and policy.compute != jnp.float32)):
        return None
    if extras.get("residual") is not None:
        extras["residual"] = extras["residual"].reshape(x2.shape[0], -1)
    scales = [w.get("scales", w["scale"]) for w in ws]  # [L] in the layer scan (stacked.py)
    ys = kernels.ternary_linear_many(x2, packed, scales, layer, **extras)
    return [y.reshape(*lead, -1).astype(policy.compute) for y in ys]


def _projections(x: jax.Array, ws: list, policy: Policy, quantized: bool) -> list:
    """The projections of x alone: packed leaves in one kernel call (quantise, matmul, scale)
    where the CPU kernel takes them, else their int32 products scaled by XLA."""
    if not all(is_packed(w) for w in ws):
        return [bitlinear(x, w, policy, quantized) for w in ws]
    fused = _kernel_call(x, ws, policy)
    if fused is not None:
        return fused
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, I]
    x_q, step = quantize_activations(x2)  # [M, I] int8, [M, 1]
    accs = kernels.ternary_matmul_many(x_q, [w["packed"] for w in ws], kernel=policy.kernel,
                                       layer=ws[0].get("layer"))  # int32 [M, O_j]
    out = []
    for acc, w in zip(accs, ws):
        y = dequantize_products(acc, step, w["scale"])
        out.append(y.reshape(*lead, -1).astype(policy.compute))
    return out
