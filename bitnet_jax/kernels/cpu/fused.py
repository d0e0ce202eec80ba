"""A BitLinear with its neighbours in one CPU kernel call: the CPU twin of gpu/fused.py.

`fused_linear_ffi(x, packed, scales, layer, norm=, eps=, residual=, act=)` runs, in one
bitnet_ternary_linear call (cpu/fused_cpu.h), the RMSNorm before a BitLinear, its per-token int8
quantisation, the packed products, their float32 scaling, and then either the residual add (o
and down projections) or the gated activation act(gate) · up (the FFN's gate/up pair). Around
the bare fused linear (ffi.ternary_linear_many_ffi) XLA would run ~4 more ops per norm (sum of
squares, rsqrt, two multiplies), one per residual add and one for the activation: issue 16's
per-layer glue, ~30 small XLA fusions per decoder layer in a CPU decode step.

Numerics: the residual add is XLA's; the norm's sum of squares and SiLU's exp round
differently (a few ulp), so an int8 code may differ by one where a value sits on a rounding
boundary; the result equals `fused_linear_composed` (the XLA ops it replaces, also its
derivative through a custom JVP) to float rounding plus such rare steps
(tests/test_fused_layer_cpu.py), as the GPU's fused kernels do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitnet_jax.errors import KernelError
from bitnet_jax.kernels.cpu import ffi
from bitnet_jax.kernels.cpu.library import LINEAR_TARGET

ACTS = {"silu": 1, "relu2": 2}  # fused_cpu.h Act


def _rms_norm(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """model/layers.py rms_norm in float32 (kernels cannot import model; a test ties them)."""
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return gain.astype(jnp.float32) * (x * jax.lax.rsqrt(var + eps))


def _act(name: str, g: jax.Array) -> jax.Array:
    """model/layers.py activation (same tie)."""
    if name == "relu2":
        r = jax.nn.relu(g)
        return r * r
    return jax.nn.silu(g)


def fused_linear_composed(x, packed, scales, layer, norm, residual, *, eps: float, act):
    """What the fused call computes, as the XLA ops it replaces (for the JVP and the tests).

    Same arguments as `fused_linear_ffi` (x float32, scales float32 [] or [L], layer the int32
    operand); returns a tuple. The bare linear's part is ffi's own composition.
    """
    if norm is not None:
        x = _rms_norm(x, norm if norm.ndim == 1 else norm[layer], eps)
    ys = ffi._linear_composed(x, layer, *scales, *packed)
    if act is not None:
        return (_act(act, ys[0]) * ys[1],)
    if residual is not None:
        return (residual + ys[0],)
    return ys


def _call(x, packed, scales, layer, norm, residual, *, eps, act):
    lead = tuple(a for a in (norm, residual) if a is not None)
    attrs = ffi.linear_attrs(eps, norm is not None, residual is not None, ACTS.get(act, 0))
    return ffi._packed_call(LINEAR_TARGET, jnp.float32, x, layer, (*lead, *scales), packed,
                            outputs=1 if act is not None else None, vmap_method="sequential",
                            **attrs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7))
def _fused(x, packed, scales, layer, norm, residual, eps, act):
    return _call(x, packed, scales, layer, norm, residual, eps=eps, act=act)


@_fused.defjvp
def _fused_jvp(eps, act, primals, tangents):
    # Differentiated (QAT through a packed leaf): the ops it replaces, so gradients are
    # unchanged by the fusion.
    return jax.jvp(lambda *a: fused_linear_composed(*a, eps=eps, act=act), primals, tangents)


def fused_linear_ffi(x: jax.Array, packed: list, scales: list, layer=None, *,
                     norm: jax.Array | None = None, eps: float = 1e-6,
                     residual: jax.Array | None = None, act: str | None = None) -> list:
    """RMSNorm -> int8 quantisation -> packed products -> scaling -> residual / act, one call.

    Args:
      x: [M, I] activations (any float dtype, used in float32); the raw residual stream when
        `norm` is given.
      packed: list of [O_j/4, I] uint8 weights, or [L, O_j/4, I] with `layer`.
      scales: each weight's dequantisation scale: a scalar, or [L] with `layer`.
      layer: int32 scalar or None (2-D weights).
      norm: None, or the RMSNorm gain [I] (or [L, I] with `layer`, read at `layer`).
      eps: the RMSNorm epsilon.
      residual: None or [M, O] (one weight): the result is residual + the product.
      act: None, "silu" or "relu2" (two weights, gate and up, of one shape): the result is
        act(gate) · up.

    Returns:
      list of [M, O_j] float32; one [M, O] with `residual` or `act`.
    """
    m, i = x.shape
    scales = ffi.linear_operands("fused_linear_ffi", x, packed, scales, layer)
    if len(scales) != len(packed):
        raise KernelError(f"fused_linear_ffi takes one scale per weight; got {len(scales)} for "
                          f"{len(packed)} weights.")
    if act is not None and (act not in ACTS or len(packed) != 2
                            or packed[0].shape != packed[1].shape or residual is not None):
        raise KernelError(f"fused_linear_ffi(act={act!r}) needs act 'silu' or 'relu2' and "
                          f"exactly the gate and up weights of one shape; got "
                          f"{[w.shape for w in packed]}.")
    if residual is not None and (len(packed) != 1
                                 or residual.shape != (m, 4 * packed[0].shape[-2])):
        raise KernelError(f"fused_linear_ffi(residual=...) needs one weight and a residual [M, "
                          f"O]; got {len(packed)} weights and {residual.shape}.")
    if norm is not None and (norm.shape[-1] != i or norm.ndim not in ((1,) if layer is None
                                                                       else (1, 2))):
        raise KernelError(f"fused_linear_ffi(norm=...) needs a gain [I] (or [L, I] with a "
                          f"layer); got {norm.shape} for I = {i}.")
    f32 = (lambda a: None if a is None else a.astype(jnp.float32))
    return list(_fused(x.astype(jnp.float32), tuple(packed), tuple(scales),
                       ffi._layer_operand(layer), f32(norm), f32(residual), float(eps), act))
