"""The KV cache: layout, allocation, the attention mask, and writes.

Layout (one dict, stacked by layer; every function returns a new cache, and the engine donates
the old one so XLA updates it in place, jax-notes §5):

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

import jax
import jax.numpy as jnp

from bitnet_jax.model.config import ModelConfig


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


def positions(starts: jax.Array, index: jax.Array, t: int) -> jax.Array:
    """RoPE positions [B, T] int32 of this call's T tokens: slot - starts[b], never below 0."""
    slots = index + jnp.arange(t, dtype=jnp.int32)[None, :]
    return jnp.maximum(slots - starts[:, None], 0)


def write(cache: dict, k: jax.Array, v: jax.Array, layer, index) -> dict:
    """The cache with this call's keys/values in layer `layer`, slots index..index+T-1.

    Args:
      cache: {"k", "v"} [L, B, K, S, H].
      k, v: [B, K, T, H] new keys/values (cast to the cache dtype).
      layer, index: int32 scalars.
    """
    at = (layer, 0, 0, index, 0)
    return {"k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), at),
            "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), at)}


def layer_view(cache: dict, layer) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s keys and values, [B, K, S, H] each (a copy inside lax.scan)."""
    keys = jax.lax.dynamic_index_in_dim(cache["k"], layer, 0, keepdims=False)
    values = jax.lax.dynamic_index_in_dim(cache["v"], layer, 0, keepdims=False)
    return keys, values
