"""Pallas GPU kernel: causal GQA attention over one layer of the stacked KV cache, in place.

`cached_attention_pallas(q [Bq, T, N, H], cache_k [L, B, K, S, H], cache_v, layer, rows [Bq],
pos [Bq]) -> [Bq, T, N, H]`: query t of row i sits at position pos[i] + t and attends to
positions 0..pos[i] + t of cache row rows[i] of layer `layer`; query head j uses kv head
j // G (G = N/K). The same contract as the CPU kernel (kernels/cpu/attention_cpu.h).

Why a kernel: XLA's attention (model/attention.py `attend`) needs the layer's keys and values
as arrays, and inside the layer scan `cache[layer]` is a copy: 2·B·K·S·H elements written and
read again per layer and step (5 MB per layer for 2B4T at S = 1024, B = 1, bf16: more than the
layer's packed weights), plus about ten launches for scores, softmax and the weighted sum. Here
one program per (row, kv head, block of query rows) reads the cache at (layer, rows[i], kv head)
in place, block by block, and only up to the block's last visible position.

Algorithm: FlashAttention's online softmax (Dao et al. 2022, "FlashAttention", Algorithm 1;
Milakov & Gimelshein 2018 for the running max/sum): for each key block, scores s = q·kᵀ/√H
(float32), running max m, rescale factor exp(m_old − m_new), running sum l and output acc; out
= acc / l. The G query heads that share a kv head and the T query positions are one block of
T·G query rows ([Bq, K, T·G, H], so the q·kᵀ and p·v products are matmuls of ≥ 16 rows, as
Triton's dot needs). Keys, values and probabilities are cast to q's dtype (the compute dtype)
before the products, as `attend` does. Precision: float32 in, IEEE float32 dots (no TF32).

Constraints of the compiled (Triton) kernel, checked by `usable`: S a multiple of 16 (key
blocks are powers of two) and H ≥ 8. An H that is not a power of two ≥ 16 (96 for
bitnet_b1_58-large, 8 for the tiny test model) is padded to one: q with zeros in XLA, the cache
by masked loads (interpret mode, whose slices clamp, pads a copy instead). The KV cache dtype is
float32, bfloat16 or float16. Split-K over S (flash-decoding) is not done: at batch 1 a decode step runs K programs
per layer, each reading S·H keys and values.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitnet_jax.errors import ConfigError
from bitnet_jax.kernels.gpu import pallas as ternary

_NEG = -1e30
_MIN_BLOCK = 16


def usable(q_shape, cache_shape) -> bool:
    """True if the compiled kernel handles these shapes (module docstring)."""
    h, s = cache_shape[-1], cache_shape[-2]
    n, k = q_shape[2], cache_shape[2]
    return h >= 8 and s % _MIN_BLOCK == 0 and n % k == 0 and q_shape[-1] == h


def _padded_head(h: int) -> int:
    return max(_MIN_BLOCK, 1 << (h - 1).bit_length())


def _key_block(s: int) -> int:
    b = 64
    while s % b:
        b //= 2
    return b


def cached_attention_pallas(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer,
                            rows: jax.Array, pos: jax.Array, *,
                            interpret: bool | None = None) -> jax.Array:
    """Causal GQA attention of q over layer `layer` of the cache, read in place.

    Args:
      q: [Bq, T, N, H] queries (RoPE applied).
      cache_k, cache_v: [L, B, K, S, H] the stacked cache (this call's keys already written).
      layer: int32 scalar.
      rows: [Bq] int32, the cache row of each query row.
      pos: [Bq] int32, the position of each row's first query.
      interpret: as in kernels/gpu/pallas.py (None: compiled on a GPU target).

    Returns:
      [Bq, T, N, H] in q's dtype.
    """
    bq, t, n, h = q.shape
    nl, _, k, s, hc = cache_k.shape
    if cache_v.shape != cache_k.shape or hc != h or n % k:
        raise ConfigError(f"cached_attention_pallas: q {q.shape} does not match the cache "
                          f"{cache_k.shape} / {cache_v.shape} (need H equal, N a multiple of K).")
    interp = ternary.resolve_interpret(interpret)
    if not interp and not usable(q.shape, cache_k.shape):
        raise ConfigError(f"cached_attention_pallas: the compiled kernel needs H >= 8 and S a "
                          f"multiple of 16; got H={h}, S={s}.")
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return _attention(q, cache_k, cache_v, layer, rows.astype(jnp.int32),
                      pos.astype(jnp.int32), interpret=interp)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _attention(q, cache_k, cache_v, layer, rows, pos, *, interpret: bool):
    bq, t, n, h = q.shape
    k, s = cache_k.shape[2], cache_k.shape[3]
    g = n // k
    tg = t * g
    block_q = max(_MIN_BLOCK, min(64, 1 << (tg - 1).bit_length()))
    padded = -(-tg // block_q) * block_q
    # [Bq, T, K, G, H] -> [Bq, K, T·G, H]: the rows that share kv head k, t-major.
    hp = _padded_head(h)
    q2 = q.reshape(bq, t, k, g, h).transpose(0, 2, 1, 3, 4).reshape(bq, k, tg, h)
    if (padded, hp) != (tg, h):
        q2 = jnp.pad(q2, ((0, 0), (0, 0), (0, padded - tg), (0, hp - h)))
    if interpret and hp != h:  # interpret-mode slices clamp: give them a padded copy
        pad = ((0, 0),) * 4 + ((0, hp - h),)
        cache_k, cache_v = jnp.pad(cache_k, pad), jnp.pad(cache_v, pad)
    bs = _key_block(s)
    kernel = functools.partial(_kernel, groups=g, block_s=bs, s_len=s, scale=1.0 / math.sqrt(h),
                               head=h if hp != h else None)
    compiler_params = None
    if not interpret:
        compiler_params = ternary._pl_triton.CompilerParams(num_warps=4, num_stages=2)
    itemsize = jnp.dtype(cache_k.dtype).itemsize
    # HBM bytes when every position is visible: q, out, and each (row, kv head)'s keys and
    # values once per query block (hlo.py reads this; the stacked cache is not read whole).
    moved = (2 * q2.size * q2.dtype.itemsize
             + 2 * bq * k * (padded // block_q) * s * h * itemsize + 12 * bq + 4)
    full = lambda b, kh, r: (0,) * 5  # noqa: E731 - the whole stacked cache, indexed in-kernel
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q2.shape, q.dtype),
        grid=(bq, k, padded // block_q),
        in_specs=[pl.BlockSpec((1,), lambda b, kh, r: (0,)),
                  pl.BlockSpec((1,), lambda b, kh, r: (b,)),
                  pl.BlockSpec((1,), lambda b, kh, r: (b,)),
                  pl.BlockSpec((None, None, block_q, hp), lambda b, kh, r: (b, kh, r, 0)),
                  pl.BlockSpec(cache_k.shape, full),
                  pl.BlockSpec(cache_v.shape, full)],
        out_specs=pl.BlockSpec((None, None, block_q, hp), lambda b, kh, r: (b, kh, r, 0)),
        compiler_params=compiler_params,
        interpret=interpret,
        name="cached_attention",
        metadata={"bytes_accessed": str(moved), "kernel": "cached_attention",
                  "stacked_layers": str(cache_k.shape[0])},
    )(layer, rows, pos, q2, cache_k, cache_v)
    out = out[:, :, :tg, :h].reshape(bq, k, t, g, h).transpose(0, 2, 1, 3, 4)
    return out.reshape(bq, t, n, h)


def _kernel(layer_ref, row_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, groups: int,
            block_s: int, s_len: int, scale: float, head: int | None):
    """One [block_q, Hp] block of query rows of (row b, kv head kh) over its visible keys;
    `head`: the real H when Hp pads it (loads of columns >= H are masked to 0)."""
    kh, rblk = pl.program_id(1), pl.program_id(2)
    layer, row, p0 = layer_ref[0], row_ref[0], pos_ref[0]
    block_q, h = q_ref.shape
    q = q_ref[...]
    qpos = p0 + (rblk * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q,), 0)) // groups
    last = jnp.minimum(p0 + (rblk * block_q + block_q - 1) // groups, s_len - 1)
    nt = (((1,), (1,)), ((), ()))

    def body(j, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(j * block_s, block_s)
        keys = _load(k_ref.at[layer, row, kh, pl.ds(s0, block_s), pl.ds(0, h)], head)
        values = _load(v_ref.at[layer, row, kh, pl.ds(s0, block_s), pl.ds(0, h)], head)
        scores = jax.lax.dot_general(q, keys.astype(q.dtype), nt,
                                     preferred_element_type=jnp.float32) * scale
        kpos = s0 + jax.lax.broadcasted_iota(jnp.int32, (block_s,), 0)
        scores = jnp.where(kpos[None, :] <= qpos[:, None], scores, _NEG)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        pv = jax.lax.dot_general(p.astype(q.dtype), values.astype(q.dtype),
                                 (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha[:, None] + pv

    init = (jnp.full((block_q,), _NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, h), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, last // block_s + 1, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


def _load(view, head: int | None) -> jax.Array:
    """A [block_s, Hp] cache tile; columns >= head read as 0 when head is given."""
    if head is None:
        return view[...]
    cols = jax.lax.broadcasted_iota(jnp.int32, view.shape, 1)
    return ternary._pl_triton.load(view, mask=cols < head, other=0)
