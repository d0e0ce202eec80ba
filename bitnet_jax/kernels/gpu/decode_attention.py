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
G <= 16, S a multiple of 16); a half that is not a power of two >= 16 (48 for
bitnet_b1_58-large, 50 for the 3B) is padded to one by masked loads and stores. As in
attention.py: keys, values and probabilities are cast to
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
    return h % 2 == 0 and heads % k == 0 and heads // k <= _BQ and s % 16 == 0


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
            f"{cache_k.shape} (need (N + 2K)·H columns, H even, N/K <= 16, S a multiple of "
            "16).")
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
    hh = h // 2
    hp = _padded_half(hh)
    out_rows, out_cols = heads, h
    operands_cache = (cache_k, cache_v)
    if interpret:  # interpret-mode slices clamp: give the 16-row blocks and the halves room
        wide = hh + hp - h
        qkv3 = jnp.pad(qkv3, ((0, 0), (0, _BQ), (0, wide)))
        cos, sin = (jnp.pad(t, ((0, 0), (0, max(0, hp - h)))) for t in (cos, sin))
        operands_cache = tuple(jnp.pad(c, ((0, 0),) * 4 + ((0, wide),)) for c in operands_cache)
        out_rows, out_cols = heads + _BQ, hh + hp
    kernel = functools.partial(_kernel, heads=heads, kv=k, groups=g, block_s=_key_block(s),
                               scale=1.0 / math.sqrt(h), hh=hh, hp=hp, masked=not interpret)
    compiler_params = None
    if not interpret:
        compiler_params = ternary._pl_triton.CompilerParams(num_warps=4, num_stages=2)
    item = jnp.dtype(cache_k.dtype).itemsize
    # HBM bytes when every position is visible: qkv, cos/sin, out, each row's keys and values
    # of this layer once, and the new key and value written.
    moved = (qkv3.size * qkv3.dtype.itemsize + 2 * cos.size * 4 + b * heads * h * qkv3.dtype.itemsize
             + 2 * b * k * (s + 1) * h * item + 8 * b + 4)
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, n=a.ndim: (0,) * n)  # noqa: E731
    operands = (layer, pos, cos, sin, qkv3) + operands_cache
    ck_in, cv_in = operands_cache
    out, ck, cv = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, out_rows, out_cols), qkv3.dtype),
                   jax.ShapeDtypeStruct(ck_in.shape, ck_in.dtype),
                   jax.ShapeDtypeStruct(cv_in.shape, cv_in.dtype)),
        grid=(b, k),
        in_specs=[whole(a) for a in operands],
        out_specs=(pl.BlockSpec((b, out_rows, out_cols), lambda i, j: (0, 0, 0)),
                   whole(ck_in), whole(cv_in)),
        input_output_aliases={5: 1, 6: 2},
        compiler_params=compiler_params,
        interpret=interpret,
        name="decode_attention",
        metadata={"bytes_accessed": str(moved), "kernel": "decode_attention",
                  "stacked_layers": str(cache_k.shape[0])},
    )(*operands)
    if interpret:
        out, ck, cv = out[:, :, :h], ck[..., :h], cv[..., :h]
    return out[:, :heads].reshape(b, heads * h), ck, cv


def _padded_half(hh: int) -> int:
    return max(16, 1 << (hh - 1).bit_length())


def _kernel(layer_ref, pos_ref, cos_ref, sin_ref, qkv_ref, _k_in, _v_in, o_ref, k_ref, v_ref,
            *, heads, kv, groups, block_s, scale, hh, hp, masked):
    """Program (row b, kv head): hh = H/2 real columns per half, hp >= hh loaded per half
    (columns >= hh masked to 0 when compiled; interpret mode gets padded arrays)."""
    bi, kh = pl.program_id(0), pl.program_id(1)
    layer, p = layer_ref[0], pos_ref[bi]
    s_len = k_ref.shape[3]
    cdt, kdt = qkv_ref.dtype, k_ref.dtype
    f32 = jnp.float32
    pad = hp != hh
    col_ok = jax.lax.broadcasted_iota(jnp.int32, (hp,), 0) < hh
    rows_ok = jax.lax.broadcasted_iota(jnp.int32, (_BQ, hp), 0) < groups
    q0 = kh * groups
    # The hi half's start as a traced value: with a padded half (hp > hh) its masked loads and
    # stores reach past H, which Pallas's static bounds check would refuse for a constant start.
    hi = hh + 0 * bi

    def load(view, mask):  # mask: None (nothing to mask) or where the loaded values are real
        if mask is None:
            return view[...]
        if masked:
            return ternary._pl_triton.load(view, mask=mask, other=0)
        return jnp.where(mask, view[...], 0)  # interpret mode: padded arrays, zero the pad

    def store(view, val, mask):
        if mask is None or not masked:  # interpret mode: the arrays are padded
            view[...] = val
        else:
            ternary._pl_triton.store(view, val, mask=mask)

    row_mask = (rows_ok & col_ok[None, :]) if masked else (
        jnp.broadcast_to(col_ok[None, :], (_BQ, hp)) if pad else None)
    vec_mask = col_ok if pad else None
    tile_mask = jnp.broadcast_to(col_ok[None, :], (block_s, hp)) if pad else None
    cos = load(cos_ref.at[bi, pl.ds(0, hp)], vec_mask)  # the halves of the table repeat
    sin = load(sin_ref.at[bi, pl.ds(0, hp)], vec_mask)

    def q_half(c0):  # [BQ, hp] float32 of this kv head's query heads, columns c0..
        return load(qkv_ref.at[bi, pl.ds(q0, _BQ), pl.ds(c0, hp)], row_mask).astype(f32)

    def vec(row, c0):  # [hp] float32 of one key or value head
        return load(qkv_ref.at[bi, row, pl.ds(c0, hp)], vec_mask).astype(f32)

    q_lo, q_hi = q_half(0), q_half(hi)
    ql = (q_lo * cos[None, :] - q_hi * sin[None, :]).astype(cdt)
    qh = (q_hi * cos[None, :] + q_lo * sin[None, :]).astype(cdt)
    k_lo, k_hi = vec(heads + kh, 0), vec(heads + kh, hi)
    kl = (k_lo * cos - k_hi * sin).astype(cdt).astype(kdt)
    kr = (k_hi * cos + k_lo * sin).astype(cdt).astype(kdt)
    vl, vr = vec(heads + kv + kh, 0).astype(kdt), vec(heads + kv + kh, hi).astype(kdt)

    @pl.when(p < s_len)  # model/cache.write drops positions past S
    def _():
        for ref, lo, upper in ((k_ref, kl, kr), (v_ref, vl, vr)):  # lo first: hi overwrites its pad
            store(ref.at[layer, bi, kh, p, pl.ds(0, hp)], lo, vec_mask)
            store(ref.at[layer, bi, kh, p, pl.ds(hi, hp)], upper, vec_mask)

    # The new position first: its score starts the running max, its weight is exp(0) = 1.
    up = lambda a: a.astype(cdt).astype(f32)  # noqa: E731 - cache dtype -> compute dtype
    m = (jnp.sum(ql.astype(f32) * up(kl)[None, :], axis=1)
         + jnp.sum(qh.astype(f32) * up(kr)[None, :], axis=1)) * scale
    l = jnp.ones((_BQ,), f32)
    acc_lo = jnp.broadcast_to(up(vl)[None, :], (_BQ, hp))
    acc_hi = jnp.broadcast_to(up(vr)[None, :], (_BQ, hp))
    nt = (((1,), (1,)), ((), ()))
    nn = (((1,), (0,)), ((), ()))

    def body(j, carry):
        m, l, acc_lo, acc_hi = carry
        s0 = pl.multiple_of(j * block_s, block_s)

        def tile(ref, c0):
            view = ref.at[layer, bi, kh, pl.ds(s0, block_s), pl.ds(c0, hp)]
            return load(view, tile_mask).astype(cdt)

        scores = (jax.lax.dot_general(ql, tile(k_ref, 0), nt, preferred_element_type=f32)
                  + jax.lax.dot_general(qh, tile(k_ref, hi), nt, preferred_element_type=f32))
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
            prob, tile(v_ref, hi), nn, preferred_element_type=f32)
        return m_new, l, acc_lo, acc_hi

    visible = jnp.minimum(p, s_len)
    m, l, acc_lo, acc_hi = jax.lax.fori_loop(0, (visible + block_s - 1) // block_s, body,
                                             (m, l, acc_lo, acc_hi))
    for c0, acc in ((0, acc_lo), (hi, acc_hi)):  # lo first: hi overwrites its padding
        val = (acc / l[:, None]).astype(o_ref.dtype)
        view = o_ref.at[bi, pl.ds(q0, _BQ), pl.ds(c0, hp)]
        if masked:
            store(view, val, rows_ok & col_ok[None, :])
        else:  # interpret mode: keep the rows of the next kv head's queries
            view[...] = jnp.where(rows_ok, val, view[...])
