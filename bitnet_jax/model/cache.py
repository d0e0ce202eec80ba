"""The KV cache: layout, allocation, the attention mask, positions and writes.

Layout (one dict, stacked by layer; every function returns a new cache, and the engine donates
the old one so XLA updates it in place, jax-notes §5):

  {"k": [L, B, K, S, H], "v": [L, B, K, S, H]}   in policy.kv_cache (the compute dtype unless
                                                 Policy.kv_cache_dtype says float16/bfloat16)

Heads come before positions so that, per (row, kv head), the S cached keys are one contiguous
[S, H] matrix: with the [B, S, K, H] order XLA:CPU's decode attention was 10x slower (8.9 ms vs
0.9 ms per layer at S=2048, measured here), and it dominated decoding at long contexts.

Each cache row is a slot of the serving engine (runtime/engine.py) and holds one sequence from
position 0: there is no shared write cursor and no left padding. A call's queries come in Bq
rows with `pos` [Bq], the position of each row's first query (query t of row i is at position
pos[i] + t, which is also its RoPE position), and either
  * slot=None: query row i is cache row i (Bq <= B; the decode step of the first Bq slots), or
  * slot (int32 scalar): the single query row (Bq == 1) is cache row `slot` (a prefill chunk
    written straight into the slot: JetStream's "insert" without a second cache; MaxText's
    insert with a traced slot index).
A query sees positions 0..pos[i] + t of its cache row.

Writes: a prefill chunk is one dynamic_update_slice at (layer, slot, 0, pos, 0); a decode step
is one scatter of B rows at their own positions (0.17 ms for 24 layers x 16 rows of the large
shape on this CPU, in place, against 0.06 ms for a shared-cursor dynamic_update_slice; a
one-hot `where` rewrite of the layer was 250 ms). Positions past S are dropped, never clamped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax.model.config import ModelConfig


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """Zeroed KV cache {"k", "v"}: [L, B, K, S, H] each, B = batch slots, S = length."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def positions(pos: jax.Array, t: int) -> jax.Array:
    """Positions [Bq, T] int32 of this call's T queries per row: pos[i] + t."""
    return pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def attention_mask(pos: jax.Array, t: int, s: int) -> jax.Array:
    """Boolean [Bq, T, S] mask: query t of row i sees key positions 0..pos[i] + t."""
    k_pos = jnp.arange(s, dtype=jnp.int32)
    return k_pos[None, None, :] <= positions(pos, t)[:, :, None]


def write(cache: dict, k: jax.Array, v: jax.Array, layer, pos: jax.Array, slot=None) -> dict:
    """The cache with this call's keys/values in layer `layer`.

    Args:
      cache: {"k", "v"} [L, B, K, S, H].
      k, v: [Bq, K, T, H] new keys/values (cast to the cache dtype).
      layer: int32 scalar.
      pos: [Bq] int32 position of each row's first new key.
      slot: None (row i -> cache row i, Bq <= B) or an int32 scalar (Bq == 1 -> cache row slot).
    """
    k, v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
    if slot is not None:
        # dynamic_update_slice clamps a start that would overflow; the engine's prefill chunks
        # always fit (engine.prefill_plan), so the clamp never moves a write.
        at = (layer, slot, 0, pos[0], 0)
        return {"k": jax.lax.dynamic_update_slice(cache["k"], k[None], at),
                "v": jax.lax.dynamic_update_slice(cache["v"], v[None], at)}
    b, _, t, _ = k.shape
    rows = jnp.arange(b)[:, None]  # [B, 1]
    cols = positions(pos, t)  # [B, T]
    # Advanced indices around a slice: the result dims are [B, T, K, H].
    def put(c, new):
        return c.at[layer, rows, :, cols, :].set(new.transpose(0, 2, 1, 3), mode="drop")

    return {"k": put(cache["k"], k), "v": put(cache["v"], v)}


def layer_view(cache: dict, layer, bq: int, slot=None) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s keys and values for Bq query rows, [Bq, K, S, H] each (a copy inside
    lax.scan): cache rows 0..Bq-1, or with `slot` that one row."""
    keys = jax.lax.dynamic_index_in_dim(cache["k"], layer, 0, keepdims=False)
    values = jax.lax.dynamic_index_in_dim(cache["v"], layer, 0, keepdims=False)
    start = 0 if slot is None else slot
    keys = jax.lax.dynamic_slice_in_dim(keys, start, bq, axis=0)
    values = jax.lax.dynamic_slice_in_dim(values, start, bq, axis=0)
    return keys, values


def cache_rows(b: int, slot=None) -> jax.Array:
    """The cache row of each of the Bq query rows: [slot] or 0..B-1 (int32 [Bq])."""
    if slot is not None:
        return jnp.reshape(jnp.asarray(slot, jnp.int32), (1,))
    return jnp.arange(b, dtype=jnp.int32)
