"""Pallas GPU kernel: RMSNorm -> int8 quantisation -> packed ternary matmul -> epilogue, one call.

`fused_bitlinear(x [M, I], packed [(L, R_j, I)], scales [(L,)], layer, norm=[L, I] | None,
eps, residual=[M, O] | None, act=None) -> [M, ΣO_j]` (or [M, O_gate] with `act`) computes,
in the compute dtype of x and exactly as model/bitlinear.py composes it in XLA:

  y   = norm[layer] · rms_norm(x)           (model/layers.rms_norm; skipped without `norm`)
  x_q = round(y · 127 / max|y|), step = max|y| / 127   (quant.quantize_activations, per row)
  out = (x_q · t_jᵀ) · (step · scales_j[layer])         (the BitLinear product, per weight j)
  out = residual + out                                   (with `residual`: o_proj, down_proj)
  out = act(out_gate) · out_up                           (with `act`: the gate/up pair)

Why: launches, not bytes. A decode step at batch 1 is ~1 GB of weights for 2B4T, ~0.3 ms at
H100 bandwidth, but the XLA composition launched 27 kernels per layer (three per
norm + quantise: the sum of squares, the absmax of the normalised row, the convert, since XLA
cannot fuse two dependent reductions; one per dequantise/residual/activation), 832 per step:
at ~3 µs per launch that is 2.5 ms (benchmarks/README.md, compile-only H100). Here each
BitLinear of a layer is one launch (model/fused.py: five per layer with the fused attention).

How: every program recomputes the row statistics of the whole input (a few KB per row, read
from L2; the decode variant is for M ≤ 16 rows) in two passes (sum of squares, then the absmax
of the normalised row), then runs the K loop of kernels/gpu/pallas.py's int8 MMA on tiles it
quantises itself, and applies the epilogue to its [M, 4·bn] outputs. No split-K (the epilogue
needs whole sums); the grid is the packed row blocks, one layer of each weight read in place
from the stacked [L, R, I] array. Rounding is half-to-even like jnp.round (Triton has no
round: floor(v + 0.5), moved down on odd ties). Outputs are in natural column order
(output row r + p·R of weight j at column off_j + p·R + r), so q/k/v are column ranges.

Shapes it takes (`usable`): M ≤ 16, I a multiple of 32, every R_j a multiple of 16. Interpret
mode (any backend) runs the same body; its slices clamp, so rows are padded to 16 there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitnet_jax.errors import ConfigError
from bitnet_jax.kernels.gpu import pallas as ternary
from bitnet_jax.quant import ACT_EPS

MAX_M = 16
_BM = 16  # rows per program: Triton's int8 dot needs >= 16; rows >= M are masked
_BN = 16  # packed rows per program (4·16 outputs per weight)


def usable(m: int, i: int, rs: Sequence[int]) -> bool:
    """True if the fused kernel takes x [m, i] and packed weights with R_j rows (docstring)."""
    return 1 <= m <= MAX_M and i % 32 == 0 and all(r % _BN == 0 and r > 0 for r in rs)


def fused_bitlinear(x: jax.Array, packed: Sequence[jax.Array], scales: Sequence[jax.Array],
                    layer, *, norm: jax.Array | None = None, eps: float = 1e-6,
                    residual: jax.Array | None = None, act: Callable | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """One BitLinear (or several sharing x) with its norm, quantisation and epilogue fused.

    Args:
      x: [M, I] activations in the compute dtype (the raw residual stream when `norm` is given).
      packed: stacked uint8 weights [L, R_j, I] (R_j = O_j/4), read at `layer` in place.
      scales: the weights' float32 scales, [L] each.
      layer: int32 scalar.
      norm: None or the stacked RMSNorm gain [L, I].
      eps: the RMSNorm epsilon.
      residual: None or [M, O] (one weight only): returned plus the product.
      act: None or the FFN activation (two weights, gate and up, of equal R).
      interpret: as in kernels/gpu/pallas.py (None: compiled on a GPU target).

    Returns:
      [M, ΣO_j] in x's dtype, weights side by side; [M, O] with `act`.
    """
    packed, scales = list(packed), list(scales)
    m, i = x.shape
    rs = tuple(w.shape[1] for w in packed)
    if (len(scales) != len(packed) or any(w.ndim != 3 for w in packed)
            or any(w.shape[2] != i for w in packed) or not usable(m, i, rs)):
        raise ConfigError(
            f"fused_bitlinear takes x [M <= {MAX_M}, I % 32 == 0] and stacked packed [L, R, I] "
            f"with R % {_BN} == 0 and one scale each; got x {x.shape}, packed "
            f"{[w.shape for w in packed]}, {len(scales)} scales.")
    if act is not None and (len(packed) != 2 or rs[0] != rs[1]):
        raise ConfigError("fused_bitlinear(act=...) needs exactly the gate and up weights, "
                          f"of equal size; got {[w.shape for w in packed]}.")
    if residual is not None and (len(packed) != 1 or residual.shape != (m, 4 * rs[0])):
        raise ConfigError(f"fused_bitlinear(residual=...) needs one weight and a residual "
                          f"[M, O]; got {len(packed)} weights and {residual.shape}.")
    interp = ternary.resolve_interpret(interpret)
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return _fused(x, tuple(packed), tuple(s.astype(jnp.float32) for s in scales), layer, norm,
                  residual, eps=float(eps), act=act, interpret=interp)


@functools.partial(jax.jit, static_argnames=("eps", "act", "interpret"))
def _fused(x, ws, scales, layer, norm, residual, *, eps, act, interpret):
    m, i = x.shape
    rs = tuple(w.shape[1] for w in ws)
    bk = 256  # the largest power-of-two K step (<= 256) dividing I
    while i % bk:
        bk //= 2
    gated = act is not None
    blocks = [r // _BN for r in rs]
    grid = blocks[0] if gated else sum(blocks)
    width = 4 * rs[0] if gated else 4 * sum(rs)
    rows = _BM if interpret else m  # interpret mode: padded rows (its slices clamp)
    if interpret and m != _BM:
        x = jnp.pad(x, ((0, _BM - m), (0, 0)))
        if residual is not None:
            residual = jnp.pad(residual, ((0, _BM - m), (0, 0)))
    operands = [layer, x] + ([norm] if norm is not None else []) + list(scales)
    operands += ([residual] if residual is not None else []) + list(ws)
    kernel = functools.partial(
        _kernel, n_w=len(ws), has_norm=norm is not None, has_res=residual is not None,
        act=act, m=m, i=i, bk=bk, eps=eps, rs=rs, masked=not interpret and m != _BM)
    compiler_params = None
    if not interpret:
        compiler_params = ternary._pl_triton.CompilerParams(num_warps=4, num_stages=3)
    item = x.dtype.itemsize
    moved = (sum(rs) * i + m * i * item + (i * 4 if norm is not None else 0) + 4 * len(ws)
             + m * width * item * (2 if residual is not None else 1) + 4)
    whole = lambda a: pl.BlockSpec(a.shape, lambda r, n=a.ndim: (0,) * n)  # noqa: E731
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, width), x.dtype),
        grid=(grid,),
        in_specs=[whole(a) for a in operands],
        out_specs=pl.BlockSpec((rows, width), lambda r: (0, 0)),
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"fused_bitlinear_x{len(ws)}" + ("_act" if gated else "")
        + ("_res" if residual is not None else ""),
        metadata={"bytes_accessed": str(moved), "kernel": "fused_bitlinear",
                  "weights": str(len(ws)), "stacked_layers": str(ws[0].shape[0])},
    )(*operands)
    return out[:m] if rows != m else out


def _kernel(*refs, n_w, has_norm, has_res, act, m, i, bk, eps, rs, masked):
    it = iter(refs)
    layer_ref, x_ref = next(it), next(it)
    g_ref = next(it) if has_norm else None
    s_refs = [next(it) for _ in range(n_w)]
    res_ref = next(it) if has_res else None
    w_refs = [next(it) for _ in range(n_w)]
    o_ref = next(it)
    layer = layer_ref[0]
    rb = pl.program_id(0)
    steps = i // bk
    row_ok = jax.lax.broadcasted_iota(jnp.int32, (_BM, 1), 0) < m
    cdt = x_ref.dtype

    def x_tile(k):  # [BM, bk] float32, rows >= M read as 0
        view = x_ref.at[pl.ds(0, _BM), pl.ds(pl.multiple_of(k * bk, bk), bk)]
        if not masked:
            return view[...].astype(jnp.float32)
        mask = jnp.broadcast_to(row_ok, (_BM, bk))
        return ternary._pl_triton.load(view, mask=mask, other=0).astype(jnp.float32)

    inv_rms = None
    if has_norm:  # pass 1: mean of squares (rms_norm's float32 statistics)
        def squares(k, ss):
            xt = x_tile(k)
            return ss + jnp.sum(xt * xt, axis=1)
        ss = jax.lax.fori_loop(0, steps, squares, jnp.zeros((_BM,), jnp.float32))
        inv_rms = jax.lax.rsqrt(ss / jnp.float32(i) + jnp.float32(eps))

    def y_tile(k):  # the BitLinear input as model/layers.rms_norm rounds it, in float32
        xt = x_tile(k)
        if not has_norm:
            return xt
        normed = (xt * inv_rms[:, None]).astype(cdt).astype(jnp.float32)
        gain = g_ref[layer, pl.ds(pl.multiple_of(k * bk, bk), bk)].astype(cdt)
        return (gain.astype(jnp.float32)[None, :] * normed).astype(cdt).astype(jnp.float32)

    # pass 2: per-row absmax (quant.quantize_activations)
    amax = jax.lax.fori_loop(0, steps, lambda k, a: jnp.maximum(a, jnp.max(jnp.abs(y_tile(k)),
                                                                           axis=1)),
                             jnp.zeros((_BM,), jnp.float32))
    amax = jnp.maximum(amax, jnp.float32(ACT_EPS))
    inv = jnp.float32(127.0) / amax
    step = amax / jnp.float32(127.0)

    def quantize(k):  # [BM, bk] int8 and its row sums
        v = y_tile(k) * inv[:, None]
        r = jnp.floor(v + 0.5)
        odd_tie = (r - v == 0.5) & (r - 2.0 * jnp.floor(r * 0.5) == 1.0)
        r = jnp.clip(jnp.where(odd_tie, r - 1.0, r), -128.0, 127.0)
        return r.astype(jnp.int32).astype(jnp.int8)

    def products(ws_local, r0):
        """int32 sums [BM, bn] for every plane of every weight in ws_local at packed row r0."""
        nt = (((1,), (1,)), ((), ()))

        def body(k, carry):
            accs, xs = carry
            q = quantize(k)
            xs = xs + jnp.sum(q.astype(jnp.int32), axis=1)
            new = []
            for n, w_ref in enumerate(ws_local):
                tile = w_ref[layer, pl.ds(r0, _BN), pl.ds(pl.multiple_of(k * bk, bk), bk)]
                for plane in range(4):
                    part = jax.lax.dot_general(q, ternary._codes(tile, plane), nt,
                                               preferred_element_type=jnp.int32)
                    new.append(accs[4 * n + plane] + part)
            return tuple(new), xs

        zeros = jnp.zeros((_BM, _BN), jnp.int32)
        init = ((zeros,) * (4 * len(ws_local)), jnp.zeros((_BM,), jnp.int32))
        accs, xs = jax.lax.fori_loop(0, steps, body, init)
        return [a - xs[:, None] for a in accs]

    def dequant(acc, j):  # model/bitlinear.py: acc · (step · scale), in the compute dtype
        scale = s_refs[j][layer]
        return (acc.astype(jnp.float32) * (step * scale)[:, None]).astype(cdt)

    def store(col, val):
        view = o_ref.at[pl.ds(0, _BM), pl.ds(col, _BN)]
        if masked:
            ternary._pl_triton.store(view, val, mask=jnp.broadcast_to(row_ok, (_BM, _BN)))
        else:
            view[...] = val

    if act is not None:  # gate/up pair: program rb holds packed rows rb·bn.. of both
        r0 = pl.multiple_of(rb * _BN, _BN)
        accs = products(w_refs, r0)
        for plane in range(4):
            gate = dequant(accs[plane], 0).astype(jnp.float32)
            up = dequant(accs[4 + plane], 1).astype(jnp.float32)
            store(plane * rs[0] + r0, (act(gate) * up).astype(cdt))
        return

    lo, off = 0, 0
    for j in range(n_w):
        nb = rs[j] // _BN

        def one(j=j, lo=lo, off=off):
            r0 = pl.multiple_of((rb - lo) * _BN, _BN)
            accs = products([w_refs[j]], r0)
            for plane in range(4):
                col = off + plane * rs[j] + r0
                val = dequant(accs[plane], j)
                if has_res:
                    res = res_ref[pl.ds(0, _BM), pl.ds(col, _BN)] if not masked else (
                        ternary._pl_triton.load(res_ref.at[pl.ds(0, _BM), pl.ds(col, _BN)],
                                                mask=jnp.broadcast_to(row_ok, (_BM, _BN)),
                                                other=0))
                    val = (res.astype(jnp.float32) + val.astype(jnp.float32)).astype(cdt)
                store(col, val)

        if n_w == 1:
            one()
        else:
            pl.when((rb >= lo) & (rb < lo + nb))(one)
        lo, off = lo + nb, off + 4 * rs[j]
