"""The KV cache: layout, allocation, the attention mask, positions and writes.

Layout (one dict, stacked by layer; every function returns a new cache, and the engine donates
the old one so XLA updates it in place, jax-notes §5):

  {"k": [L, B, K, S, H], "v": [L, B, K, S, H]}   in policy.kv_cache (the compute dtype unless
                                                 Policy.kv_cache_dtype says float16/bfloat16)
  {"k": [L, B, K, S, H + 4], "v": ...} int8      with Policy.kv_cache_dtype="int8" (below)

int8 rows: each cached key or value row of H numbers is stored as H int8 codes
round(x * 127 / max|x|) followed by its float32 scale max|x| / 127 as 4 bytes (bitcast), so a
row is read as one contiguous run and the cache stays one array per k / v (the sharding, the
engine's slot writes and the kernels' addressing are unchanged). Per (position, kv head) absmax
is finer than BitNet's own activation quantisation (per token over all of D) and than the
per-tensor int8 / fp8 scales of TensorRT-LLM / vLLM; llama.cpp's q8_0 cache uses blocks of 32.
It halves a float16 cache's bytes, which decode attention reads once per step.

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
one-hot `where` rewrite of the layer was 250 ms; int8 rows: one index per row and head).
Positions past S are dropped, never clamped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.config import ModelConfig


_SCALE_BYTES = 4  # an int8 row's float32 scale, after its H codes


def row_width(head_dim: int, dtype) -> int:
    """Elements of one cached row: H, or H + 4 in an int8 cache (the row's scale)."""
    return head_dim + _SCALE_BYTES if jnp.dtype(dtype) == jnp.int8 else head_dim


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """Zeroed KV cache {"k", "v"}: [L, B, K, S, H] each (H + 4 int8 for an int8 cache), B =
    batch slots, S = length."""
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, length,
             row_width(cfg.head_dim, dtype))
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def quantize_rows(x: jax.Array) -> jax.Array:
    """[..., H] float -> [..., H + 4] int8: per-row absmax codes, then the float32 scale's bytes
    (module docstring). An all-zero row gets zero codes and scale 0; a NaN or inf keeps the row
    non-finite when read back (scale NaN or inf)."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    # XLA:CPU's max reduce may drop a NaN (it depends on the vectorisation): keep it.
    amax = jnp.where(jnp.isnan(x).any(axis=-1, keepdims=True), jnp.nan, amax)
    inv = jnp.where(amax > 0, 127.0 / amax, 0.0)
    codes = jnp.clip(jnp.round(x * inv), -127, 127).astype(jnp.int8)
    # amax * f32(1/127), not amax / 127: XLA rewrites a division by a constant so, and the CPU
    # kernel (kernels.quantize_kv) writes the same bytes.
    scale = jax.lax.bitcast_convert_type(amax * np.float32(1 / 127), jnp.int8)  # [..., 1, 4]
    return jnp.concatenate([codes, scale.reshape(*x.shape[:-1], _SCALE_BYTES)], axis=-1)


def widen(c: jax.Array, dtype) -> jax.Array:
    """Cached rows [..., H] (or int8 [..., H + 4]) as `dtype` [..., H]: an int8 row's codes times
    its scale, computed in float32."""
    if c.dtype != jnp.int8:
        return c.astype(dtype)
    scale = jax.lax.bitcast_convert_type(c[..., -_SCALE_BYTES:], jnp.float32)  # [...]
    return (c[..., :-_SCALE_BYTES].astype(jnp.float32) * scale[..., None]).astype(dtype)


def _store(new: jax.Array, dtype) -> jax.Array:
    if jnp.dtype(dtype) != jnp.int8:
        return new.astype(dtype)
    return new if new.dtype == jnp.int8 else quantize_rows(new)  # int8: rows already made


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
      k, v: [Bq, K, T, H] new keys/values (cast to the cache dtype, or quantize_rows), or for an
        int8 cache their int8 rows [Bq, K, T, H + 4] (kernels.quantize_kv).
      layer: int32 scalar.
      pos: [Bq] int32 position of each row's first new key.
      slot: None (row i -> cache row i, Bq <= B) or an int32 scalar (Bq == 1 -> cache row slot).
    """
    k, v = _store(k, cache["k"].dtype), _store(v, cache["v"].dtype)
    if slot is not None:
        # dynamic_update_slice clamps a start that would overflow; the engine's prefill chunks
        # always fit (engine.prefill_plan), so the clamp never moves a write.
        at = (layer, slot, 0, pos[0], 0)
        return {"k": jax.lax.dynamic_update_slice(cache["k"], k[None], at),
                "v": jax.lax.dynamic_update_slice(cache["v"], v[None], at)}
    b, heads, t, _ = k.shape
    rows = jnp.arange(b)[:, None]  # [B, 1]
    cols = positions(pos, t)  # [B, T]
    if cache["k"].dtype == jnp.int8:
        # One index per (row, head, position), a window of one row: XLA:CPU scattered the
        # [K, H + 4] windows below 3-4x slower for int8 rows (0.65-0.85 ms per cache for 24
        # layers x 8 rows of the large shape) than these (0.21-0.22 ms; float16's: 0.17-0.19).
        at = (layer, rows[:, :, None], jnp.arange(heads)[None, :, None], cols[:, None, :])
        return {"k": cache["k"].at[at].set(k, mode="drop"),
                "v": cache["v"].at[at].set(v, mode="drop")}
    # Advanced indices around a slice: the result dims are [B, T, K, H].
    def put(c, new):
        return c.at[layer, rows, :, cols, :].set(new.transpose(0, 2, 1, 3), mode="drop")

    return {"k": put(cache["k"], k), "v": put(cache["v"], v)}


def layer_view(cache: dict, layer, bq: int, slot=None) -> tuple[jax.Array, jax.Array]:
    """Layer `layer`'s keys and values for Bq query rows, [Bq, K, S, H] each (a copy inside
    lax.scan; [Bq, K, S, H + 4] int8 rows: `widen`): cache rows 0..Bq-1, or with `slot` that
    one row."""
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
