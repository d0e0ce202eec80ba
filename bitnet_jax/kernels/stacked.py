"""The layer scan over stacked params, with packed weights read in place by the kernels.

Per-layer params are stacked on a leading L axis. `lax.scan` slices every leaf per layer, and a
scan slice that feeds a custom call is copied first: 7 MB per layer of the large model, as many
bytes again as the kernel reads. So the packed uint8 [L, O/4, I] arrays are not scanned over:
`scan_layers` hands each layer the whole stack plus the layer index, as the leaf
{"packed": [L, O/4, I], "layer": l, "scale": [], "scales": [L]}, and kernels.dispatch passes
both to the kernel (the CPU and Pallas GPU kernels read matrix l in place; XLA slices it, which
on a GPU unpacks one layer at a time). The whole [L] "scales" serve the fused CPU linear, which
reads scale l itself: a scan slice passed to a custom call is one more XLA op per weight and
layer. For the same reason the leaves named in `whole` (the norm gains, where the fused CPU
linear reads gain l itself: model/bitlinear.py `whole_norms`) are handed whole, [L, ...].
Everything else is scanned as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bitnet_jax.quant import is_packed


class _Whole(NamedTuple):
    """A leaf handed to every layer whole ([L, ...]), not sliced."""

    array: jax.Array


def scan_layers(body: Callable, layers: dict, carry, *, whole: Collection[str] = ()):
    """Run `carry = body(layer_params, layer, carry)` over the L stacked layers, in order.

    Args:
      body: (params of one layer, int32 layer index, carry) -> carry. Packed leaves of the layer
        params carry the whole stack and the layer index (module docstring).
      layers: the stacked per-layer params (every leaf has a leading L axis).
      carry: the loop state (any pytree: the residual stream, the KV cache, ...).
      whole: names of array leaves (at any depth) that every layer gets whole, [L, ...]: the
        body indexes them with the layer index itself.

    Returns:
      The final carry.
    """
    xs, stacks = _split_stacks(layers, frozenset(whole))

    def step(state, p):
        carry, layer = state
        return (body(_join_stacks(p, stacks, layer), layer, carry), layer + 1), None

    (carry, _), _ = jax.lax.scan(step, (carry, jnp.int32(0)), xs)
    return carry


def _split_stacks(layers, whole: frozenset):
    """Split the stacked params into (xs, stacks): stacks holds each packed leaf's uint8 array
    and its [L] scales, and each `whole` leaf (None elsewhere), xs everything else (the scales
    too: scanned as usual)."""
    if is_packed(layers):
        return ({k: v for k, v in layers.items() if k != "packed"},
                (layers["packed"], layers["scale"]))
    if isinstance(layers, dict):
        xs, stacks = {}, {}
        for k, v in layers.items():
            if k in whole and not isinstance(v, dict):
                stacks[k] = _Whole(v)
            else:
                xs[k], stacks[k] = _split_stacks(v, whole)
        return xs, stacks
    return layers, None


def _join_stacks(xs, stacks, layer):
    """One layer's params from a scan slice of xs, the stacks and the layer index."""
    if stacks is None:
        return xs
    if isinstance(stacks, _Whole):
        return stacks.array
    if not isinstance(stacks, dict):
        packed, scales = stacks
        return {**xs, "packed": packed, "scales": scales, "layer": layer}
    return {k: _join_stacks(xs.get(k), stacks[k], layer) for k in stacks}
