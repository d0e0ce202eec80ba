"""Grouped-query causal self-attention with BitNet's attn_sub_norm, and the KV cache.

Cache layout (one dict, stacked by layer, returned new and donated by callers):

  {"k": [L, B, K, S, H], "v": [L, B, K, S, H]}   in policy.kv_cache (the compute dtype unless
                                                 Policy.kv_cache_dtype says float16/bfloat16)

Heads come before positions so that, per (row, kv head), the S cached keys are one contiguous
[S, H] matrix: with the [B, S, K, H] order XLA:CPU's decode attention was 10x slower (8.9 ms vs
0.9 ms per layer at S=2048, measured here), and it dominated decoding at long contexts.

Rows are left-padded: a shared scalar write cursor `index` (int32) says where this call's T
tokens go (slots index..index+T-1 for every row) and `starts` [B] gives the first valid slot of
each row. A query in slot q of row b attends to slots s with starts[b] <= s <= q, and its RoPE
position is q - starts[b]. A single batched dynamic_update_slice writes the cache (a per-row
scatter was measured 20x slower, jax-notes §5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bitnet_jax import kernels
from bitnet_jax.bitlinear import bitlinear, bitlinear_many
from bitnet_jax.config import ModelConfig
from bitnet_jax.layers import apply_rope, rms_norm
from bitnet_jax.policy import Policy

_NEG_INF = -1e30


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """Zeroed KV cache {"k", "v"}: [L, B, K, S, H] each, S = length."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def attention_mask(starts: jax.Array, index: jax.Array, t: int, s: int) -> jax.Array:
    """Boolean [B, T, S] mask: query t (slot index+t) sees slots starts[b] <= slot <= index+t."""
    q_slot = index + jnp.arange(t, dtype=jnp.int32)  # [T]
    k_slot = jnp.arange(s, dtype=jnp.int32)  # [S]
    causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
    valid = k_slot[None, :] >= starts[:, None]  # [B, S]
    return causal[None, :, :] & valid[:, None, :]


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


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, layer, index,
                     starts: jax.Array, mask: jax.Array, cfg: ModelConfig,
                     policy: Policy) -> tuple[jax.Array, dict]:
    """Write this call's keys/values into layer `layer` of the cache and attend over it.

    Args:
      q: [B, T, N, H] queries; k, v: [B, K, T, H] new keys/values for slots index..index+T-1.
      cache: {"k", "v"} [L, B, K, S, H].
      layer, index: int32 scalars; starts: [B] first visible slot per row; mask: [B, T, S].

    Returns:
      (out [B, T, N, H] in the compute dtype, the updated cache).

    With the CPU kernel (policy.kernel "ffi", or "auto" on CPU) and a float32 cache, attention
    reads the layer's visible slots in place (kernels/attention_cpu.h); otherwise XLA slices the
    layer out (a copy inside lax.scan) and runs `attend` over all S slots.
    """
    at = (layer, 0, 0, index, 0)  # k, v: [B, K, T, H] into [L, B, K, S, H]
    ck = jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at)
    cv = jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at)
    if kernels.attention_kernel(policy.kernel, q, ck) == "ffi":
        from bitnet_jax.kernels import cpu_ffi

        out = cpu_ffi.attention_ffi(q.astype(jnp.float32), ck, cv, layer, index, starts)
        out = out.astype(policy.compute)
    else:
        keys = jax.lax.dynamic_index_in_dim(ck, layer, 0, keepdims=False)
        values = jax.lax.dynamic_index_in_dim(cv, layer, 0, keepdims=False)
        out = attend(q, keys.astype(policy.compute), values.astype(policy.compute), mask, cfg,
                     policy)
    return out, {"k": ck, "v": cv}


def attention(p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
              cfg: ModelConfig, policy: Policy, kv=None):
    """One attention block: projections, RoPE, GQA softmax attention, sub-norm, output.

    Args:
      p: this layer's `self_attn` params (q/k/v/o_proj, optional attn_sub_norm [D]).
      x: [B, T, D] normalised residual stream.
      cos, sin: [B, T, H] RoPE tables for the T positions.
      mask: [B, T, S] boolean attention mask.
      cfg: model config.
      policy: precision policy.
      kv: optional callable (q [B, T, N, H], k, v [B, K, T, H]) -> [B, T, N, H] that writes
        this call's keys/values into the KV cache and attends over it (model.apply wraps
        `cached_attention`). Without it the call attends over its own T tokens only (S = T).

    Returns:
      [B, T, D] attention output.
    """
    b, t, _ = x.shape
    n, k_heads, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = bitlinear_many(x, [p["q_proj"], p["k_proj"], p["v_proj"]], policy, cfg.quantized)
    q = q.reshape(b, t, n, h)
    k = k.reshape(b, t, k_heads, h)
    v = v.reshape(b, t, k_heads, h)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
    out = attend(q, k, v, mask, cfg, policy) if kv is None else kv(q, k, v)
    out = out.reshape(b, t, n * h)
    if cfg.use_sub_norms:
        out = rms_norm(out, p["attn_sub_norm"], cfg.rms_norm_eps)
    return bitlinear(out, p["o_proj"], policy, cfg.quantized)
