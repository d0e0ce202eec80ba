"""Pallas GPU kernel: a decode step's attention with RoPE and the KV-cache write, one call.

`decode_attention(qkv [B, (N + 2K)·H], cos, sin [B, H], cache_k, cache_v [L, B, K, S, H],
layer, pos [B], heads=N) -> (out [B, N·H], cache_k, cache_v)`: one new token per cache row
b (T = 1, row b of the batch is cache row b, as in the engine's decode step). Its queries and
key take rotate-half RoPE at position pos[b] (model/layers.apply_rope), the key and value are
written to cache row b at pos[b] of layer `layer` (model/cache.write; a position >= S is
dropped), and the queries attend over positions 0..pos[b] (the cached ones read in place, the
new one from registers) with FlashAttention's online softmax (kernels/gpu/attention.py has the
references). `qkv` is the fused q/k/v projection as kernels/gpu/fused.py writes it: the N query
heads, then the K keys, then the K values, H columns each.

Why: the composed path launched six kernels per layer for this (RoPE of q and k, the query
layout, two cache writes, attention); here one (model/fused.py). The caches are aliased in and
out, so XLA updates them in place.

Grid (B, K): program (b, kv head) handles the G = N/K query heads of that kv head as one block
of 16 rows (Triton's dot needs >= 16; rows >= G are masked). RoPE works on the two halves of
each head separately, so the scores are two dots of H/2 (`usable`: H/2 a power of two >= 16,
G <= 16, S a multiple of 16). As in attention.py: keys, values and probabilities are cast to
the compute dtype before the products; no split over S (at batch 1, K programs per layer).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitnet_jax.errors import ConfigError
from bitnet_jax.kernels.gpu import pallas as ternary
from bitnet_jax.kernels.gpu.attention import _key_block

_NEG = -1e30
_BQ = 16  # query rows per program (the G heads of one kv head, padded)


def usable(heads: int, cache_shape) -> bool:
    """True if the kernel takes N = `heads` query heads over a cache [L, B, K, S, H]."""
    _, _, k, s, h = cache_shape
    hh = h // 2
    return (h % 2 == 0 and hh >= 16 and hh & (hh - 1) == 0 and heads % k == 0
            and heads // k <= _BQ and s % 16 == 0)


def decode_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, cache_k: jax.Array,
                     cache_v: jax.Array, layer, pos: jax.Array, *, heads: int,
                     interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RoPE, the cache write and causal GQA attention of one decode step (module docstring).

    Args:
      qkv: [B, (N + 2K)·H] q, k, v side by side, in the compute dtype.
      cos, sin: [B, H] float32 RoPE tables at pos (model/layers.rope_frequencies).
      cache_k, cache_v: [L, B', K, S, H] (B <= B'), updated in place.
      layer: int32 scalar; pos: [B] int32 position of each row's token.
      heads: N.
      interpret: as in kernels/gpu/pallas.py (None: compiled on a GPU target).

    Returns:
      (out [B, N·H] in the compute dtype, cache_k, cache_v).
    """
    b = qkv.shape[0]
    _, rows, k, s, h = cache_k.shape
    if (cache_v.shape != cache_k.shape or qkv.shape[1] != (heads + 2 * k) * h or b > rows
            or not usable(heads, cache_k.shape)):
        raise ConfigError(
            f"decode_attention: qkv {qkv.shape} with {heads} heads does not fit the cache "
            f"{cache_k.shape} (need (N + 2K)·H columns, H/2 a power of two >= 16, N/K <= 16, "
            "S a multiple of 16).")
    interp = ternary.resolve_interpret(interpret)
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return _decode(qkv.reshape(b, heads + 2 * k, h), cos.astype(jnp.float32),
                   sin.astype(jnp.float32), cache_k, cache_v, layer, pos.astype(jnp.int32),
                   heads=heads, interpret=interp)


@functools.partial(jax.jit, static_argnames=("heads", "interpret"))
def _decode(qkv3, cos, sin, cache_k, cache_v, layer, pos, *, heads, interpret):
    b, _, h = qkv3.shape
    k, s = cache_k.shape[2], cache_k.shape[3]
    g = heads // k
    out_rows = heads
    if interpret:  # interpret-mode slices clamp: give the 16-row blocks room
        qkv3 = jnp.pad(qkv3, ((0, 0), (0, _BQ), (0, 0)))
        out_rows = heads + _BQ
    kernel = functools.partial(_kernel, heads=heads, kv=k, groups=g, block_s=_key_block(s),
                               scale=1.0 / math.sqrt(h), masked=not interpret)
    compiler_params = None
    if not interpret:
        compiler_params = ternary._pl_triton.CompilerParams(num_warps=4, num_stages=2)
    item = jnp.dtype(cache_k.dtype).itemsize
    # HBM bytes when every position is visible: qkv, cos/sin, out, each row's keys and values
    # of this layer once, and the new key and value written.
    moved = (qkv3.size * qkv3.dtype.itemsize + 2 * cos.size * 4 + b * heads * h * qkv3.dtype.itemsize
             + 2 * b * k * (s + 1) * h * item + 8 * b + 4)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, n=a.ndim: (0,) * n)  # noqa: E731
    operands = (layer, pos, cos, sin, qkv3, cache_k, cache_v)
    out, ck, cv = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, out_rows, h), qkv3.dtype),
                   jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
                   jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)),
        grid=(b, k),
        in_specs=[whole(a) for a in operands],
        out_specs=(pl.BlockSpec((b, out_rows, h), lambda i, j: (0, 0, 0)),
                   whole(cache_k), whole(cache_v)),
        input_output_aliases={5: 1, 6: 2},
        compiler_params=compiler_params,
        interpret=interpret,
        name="decode_attention",
        metadata={"bytes_accessed": str(moved), "kernel": "decode_attention",
                  "stacked_layers": str(cache_k.shape[0])},
    )(*operands)
    return out[:, :heads].reshape(b, heads * h), ck, cv


def _kernel(layer_ref, pos_ref, cos_ref, sin_ref, qkv_ref, _k_in, _v_in, o_ref, k_ref, v_ref,
            *, heads, kv, groups, block_s, scale, masked):
    bi, kh = pl.program_id(0), pl.program_id(1)
    layer, p = layer_ref[0], pos_ref[bi]
    h = qkv_ref.shape[-1]
    hh, s_len = h // 2, k_ref.shape[3]
    cdt, kdt = qkv_ref.dtype, k_ref.dtype
    f32 = jnp.float32
    rows_ok = jax.lax.broadcasted_iota(jnp.int32, (_BQ, hh), 0) < groups
    q0 = kh * groups

    def q_half(c0):  # [BQ, hh] float32 of this kv head's query heads, columns c0..c0+hh
        view = qkv_ref.at[bi, pl.ds(q0, _BQ), pl.ds(c0, hh)]
        if masked:
            return ternary._pl_triton.load(view, mask=rows_ok, other=0).astype(f32)
        return view[...].astype(f32)

    cos, sin = cos_ref[bi, pl.ds(0, hh)], sin_ref[bi, pl.ds(0, hh)]  # the halves repeat
    q_lo, q_hi = q_half(0), q_half(hh)
    ql = (q_lo * cos[None, :] - q_hi * sin[None, :]).astype(cdt)
    qh = (q_hi * cos[None, :] + q_lo * sin[None, :]).astype(cdt)
    k_lo = qkv_ref[bi, heads + kh, pl.ds(0, hh)].astype(f32)
    k_hi = qkv_ref[bi, heads + kh, pl.ds(hh, hh)].astype(f32)
    kl = (k_lo * cos - k_hi * sin).astype(cdt).astype(kdt)
    kr = (k_hi * cos + k_lo * sin).astype(cdt).astype(kdt)
    vl = qkv_ref[bi, heads + kv + kh, pl.ds(0, hh)].astype(kdt)
    vr = qkv_ref[bi, heads + kv + kh, pl.ds(hh, hh)].astype(kdt)

    @pl.when(p < s_len)  # model/cache.write drops positions past S
    def _():
        k_ref[layer, bi, kh, p, pl.ds(0, hh)] = kl
        k_ref[layer, bi, kh, p, pl.ds(hh, hh)] = kr
        v_ref[layer, bi, kh, p, pl.ds(0, hh)] = vl
        v_ref[layer, bi, kh, p, pl.ds(hh, hh)] = vr

    # The new position first: its score starts the running max, its weight is exp(0) = 1.
    up = lambda a: a.astype(cdt).astype(f32)  # noqa: E731 - cache dtype -> compute dtype
    m = (jnp.sum(ql.astype(f32) * up(kl)[None, :], axis=1)
         + jnp.sum(qh.astype(f32) * up(kr)[None, :], axis=1)) * scale
    l = jnp.ones((_BQ,), f32)
    acc_lo = jnp.broadcast_to(up(vl)[None, :], (_BQ, hh))
    acc_hi = jnp.broadcast_to(up(vr)[None, :], (_BQ, hh))
    nt = (((1,), (1,)), ((), ()))
    nn = (((1,), (0,)), ((), ()))

    def body(j, carry):
        m, l, acc_lo, acc_hi = carry
        s0 = pl.multiple_of(j * block_s, block_s)

        def tile(ref, c0):
            return ref[layer, bi, kh, pl.ds(s0, block_s), pl.ds(c0, hh)].astype(cdt)

        scores = (jax.lax.dot_general(ql, tile(k_ref, 0), nt, preferred_element_type=f32)
                  + jax.lax.dot_general(qh, tile(k_ref, hh), nt, preferred_element_type=f32))
        kpos = s0 + jax.lax.broadcasted_iota(jnp.int32, (block_s,), 0)
        scores = jnp.where(kpos[None, :] < p, scores * scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        alpha = jnp.exp(m - m_new)
        prob = jnp.exp(scores - m_new[:, None])
        l = l * alpha + jnp.sum(prob, axis=1)
        prob = prob.astype(cdt)
        acc_lo = acc_lo * alpha[:, None] + jax.lax.dot_general(
            prob, tile(v_ref, 0), nn, preferred_element_type=f32)
        acc_hi = acc_hi * alpha[:, None] + jax.lax.dot_general(
            prob, tile(v_ref, hh), nn, preferred_element_type=f32)
        return m_new, l, acc_lo, acc_hi

    visible = jnp.minimum(p, s_len)
    m, l, acc_lo, acc_hi = jax.lax.fori_loop(0, (visible + block_s - 1) // block_s, body,
                                             (m, l, acc_lo, acc_hi))
    for c0, acc in ((0, acc_lo), (hh, acc_hi)):
        val = (acc / l[:, None]).astype(o_ref.dtype)
        view = o_ref.at[bi, pl.ds(q0, _BQ), pl.ds(c0, hh)]
        if masked:
            ternary._pl_triton.store(view, val, mask=rows_ok)
        else:  # interpret mode: keep the rows of the next kv head's queries
            view[...] = jnp.where(rows_ok, val, view[...])
