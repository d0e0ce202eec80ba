"""Grouped-query causal self-attention with BitNet's attn_sub_norm.

`attention` returns (out, new_cache): with a KV cache (model/cache.py) it writes this call's
keys and values and attends over every visible slot; without one it attends over its own T
tokens (S = T).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bitnet_jax import kernels
from bitnet_jax.model import cache as kv_cache
from bitnet_jax.model.bitlinear import bitlinear_many
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.layers import apply_rope
from bitnet_jax.model.policy import Policy

_NEG_INF = -1e30


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
           cfg: ModelConfig, policy: Policy) -> jax.Array:
    """GQA softmax attention in XLA.

    Args:
      q: [B, T, N, H] queries; query head j uses kv head j // G.
      keys, values: [B, K, S, H].
      mask: [B, T, S] boolean.

    Returns:
      [B, T, N, H] in the compute dtype.
    """
    b, t, n, h = q.shape
    q = q.reshape(b, t, cfg.num_key_value_heads, cfg.num_groups, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(h))
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(policy.compute)
    # Output as [B, K, G, T, H], then transpose: XLA:CPU runs it 7x faster than "->btkgh".
    out = jnp.einsum("bkgts,bksh->bkgth", probs, values, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).astype(policy.compute).reshape(b, t, n, h)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, layer,
                     pos: jax.Array, slot, mask: jax.Array, cfg: ModelConfig,
                     policy: Policy) -> tuple[jax.Array, dict]:
    """Write this call's keys/values into layer `layer` of the cache and attend over it.

    Args:
      q: [Bq, T, N, H] queries; k, v: [Bq, K, T, H] new keys/values at positions pos..pos+T-1.
      cache: {"k", "v"} [L, B, K, S, H] (int8: [L, B, K, S, H + 4], model/cache.py).
      layer: int32 scalar; pos: [Bq] int32; slot: None or an int32 scalar (model/cache.py).
      mask: [Bq, T, S].

    Returns:
      (out [Bq, T, N, H] in the compute dtype, the updated cache).

    The CPU kernel (kernels.attention_kernel: kernels/cpu/attention_cpu.h) and the Pallas GPU
    kernel (kernels/gpu/attention.py) read the layer's visible positions of the stacked cache in
    place; otherwise XLA slices the layer out (a copy) and runs `attend` over all S positions.
    """
    if cache["k"].dtype == jnp.int8 and kernels.quantize_kv_usable(policy.kernel, k):
        k, v = kernels.quantize_kv(k, v)  # the int8 rows kv_cache.write would make, in one call
    cache = kv_cache.write(cache, k, v, layer, pos, slot)
    kernel = kernels.attention_kernel(policy.kernel, q, cache["k"])
    if kernel != "xla":  # the CPU kernel takes float32 queries, the GPU one the compute dtype
        run, dtype = ((kernels.cached_attention_ffi, jnp.float32) if kernel == "ffi" else
                      (kernels.cached_attention_pallas, policy.compute))
        rows = kv_cache.cache_rows(q.shape[0], slot)
        out = run(q.astype(dtype), cache["k"], cache["v"], layer, rows, pos)
        return out.astype(policy.compute), cache
    keys, values = kv_cache.layer_view(cache, layer, q.shape[0], slot)
    out = attend(q, kv_cache.widen(keys, policy.compute), kv_cache.widen(values, policy.compute),
                 mask, cfg, policy)
    return out, cache


def attention(p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
              cfg: ModelConfig, policy: Policy, cache: dict | None = None, *, layer=None,
              pos=None, slot=None, norm: jax.Array | None = None,
              residual: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """One attention block: projections, RoPE, GQA softmax attention, sub-norm, output.

    Args:
      p: this layer's `self_attn` params (q/k/v/o_proj, optional attn_sub_norm [D]).
      x: [B, T, D] normalised residual stream (the raw stream with `norm`).
      cos, sin: [B, T, H] RoPE tables for the T positions.
      mask: [B, T, S] boolean attention mask.
      cfg: model config.
      policy: precision policy.
      cache: optional KV cache {"k", "v"} [L, B, K, S, H]; this call's keys/values go to layer
        `layer` (int32 scalar) at positions pos[i]..pos[i]+T-1 ([B] int32) of cache row i, or of
        cache row `slot` for a one-row call (model/cache.py). Without it the call attends over
        its own T tokens only (S = T).
      norm: None or the RMSNorm gain [D] to apply to x first (input_layernorm), inside the
        q/k/v kernel call where it takes it (bitlinear_many).
      residual: None or [B, T, D]: returned plus the block's output (likewise inside o_proj's).

    Returns:
      (out [B, T, D] (+ residual), the updated cache or None).
    """
    b, t, _ = x.shape
    n, k_heads, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    q, k, v = bitlinear_many(x, [p["q_proj"], p["k_proj"], p["v_proj"]], policy, cfg.quantized,
                             norm=norm, eps=eps)
    q = apply_rope(q.reshape(b, t, n, h), cos, sin)
    k = apply_rope(k.reshape(b, t, k_heads, h), cos, sin)
    v = v.reshape(b, t, k_heads, h)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    if cache is None:
        out = attend(q, k, v, mask, cfg, policy)
    else:
        out, cache = cached_attention(q, k, v, cache, layer, pos, slot, mask, cfg, policy)
    out = out.reshape(b, t, n * h)
    sub = p["attn_sub_norm"] if cfg.use_sub_norms else None
    return bitlinear_many(out, [p["o_proj"]], policy, cfg.quantized, norm=sub, eps=eps,
                          residual=residual)[0], cache
