"""Pallas GPU kernel for the packed ternary matmul (2-bit weights, int8 activations).

`ternary_matmul_many_pallas(x_q [M, I] int8, [packed_j], layer)` -> [[M, O_j] int32]: the
products of one activation matrix with several packed weights (q/k/v, gate/up) in ONE
pallas_call. With `layer` the weights are the stacked [L, O_j/4, I] arrays and the kernel reads
matrix `layer` in place (no slice or copy in the layer scan, kernels/stacked.py), as the CPU
kernel does. Exact: equal to `ternary_matmul_xla` bit for bit.

Layout (quant.py, spec §1.3): bits 2i..2i+1 of packed row r hold output row r + i·O/4 as the
code t+1 ∈ {0, 1, 2}; code 3 never occurs in valid data and means 0. One packed tile [bn, bk]
feeds four output strips, so the kernel writes the output viewed as [M, 4, O/4]. Each plane is
unpacked in registers to c' ∈ {0, 1, 2} (shift, mask, and a select mapping 3 to 1), multiplied
with the raw int8 activations, and the row sums of x, accumulated in the same loop, are
subtracted at the end: Σ x·(c'−1) = Σ x·c' − Σ x. Padding is code 0 and contributes nothing.

Products: `dot="int8"`: int8 × int8 → int32 tensor-core MMA; "bfloat16": bf16 MMA → f32 per
k-step, added in int32 (exact: a step's sum is < 2·128·bk < 2^24); "reduce": multiply + row sums
on the CUDA cores, row by row, for M ≤ 8 (default for M ≤ 4: no padded MMA rows).

Grid (all axes parallel): (M blocks, row blocks of all weights together, K splits). A program
finds its weight from its row-block index (static bounds, one `pl.when` per weight). Split-K
partial sums [splits, M, 4, ΣO/4] are added by XLA in the consumer fusion; `default_config`
keeps them under a quarter of the weight bytes. Rows or columns that are not block multiples
are masked loads (zeros, code 0: no contribution), so weights are never copied whatever their
shape; interpret mode alone pads them, because its dynamic slices clamp instead of masking.

Backend: Triton, after checking both with the deviceless H100 compile (jax 0.11.2).
  * Triton: `pl.pallas_call` lowers to it on GPU (jax/_src/pallas/pallas_call.py,
    gpu_lowering); jnp-style bodies with int8 dot_general, shifts, selects, reductions,
    fori_loop, pl.when and masked dynamic ref loads; sizes must be powers of two, dots ≥ 16 per
    dim, no scalar prefetch (so the layer index is a 1-element input). Deprecated in jax 0.11
    but shipped; every configuration here compiles to sm_90a (tests/test_gpu_aot.py).
  * Mosaic GPU: `pallas_call` with `plgpu.CompilerParams` has no lowering rule (AssertionError
    in gpu_lowering; only Triton registers one); kernels must be written anew with
    `plgpu.kernel`, SMEM pipelines and `plgpu.wgmma` (template:
    jax/experimental/pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py, int8 × bf16, Hopper
    only), and the memory-bound decode GEMV (M ≤ 64) gains nothing from wgmma. Not ported.
  Should Triton go, kernel="auto" falls back to XLA with one warning (kernels/gpu/fallback.py).
`interpret=True` runs the same body as a jitted scan over the grid on any backend.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitnet_jax.errors import ConfigError, DeviceError
from bitnet_jax.kernels.gpu.platform import default_platform, on_gpu

try:  # The Triton backend is deprecated in jax 0.11 and may disappear from a later release.
    from jax.experimental.pallas import triton as _pl_triton
except ImportError:  # pragma: no cover - depends on the installed jax
    _pl_triton = None

GEMV_MAX_M = 64
_DOT_MODES = ("int8", "bfloat16", "reduce")
_REDUCE_MAX_M = 8
_REDUCE_DEFAULT_M = 4  # "reduce" unrolls per row: its code grows with M
_MMA_MIN = 16  # Triton's dot needs every dimension >= 16.
_TARGET_PROGRAMS = 264  # two programs per SM of an H100 (132 SMs)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tiling of one pallas_call (frozen: a static jit argument).

    Attributes:
      bm: activation rows per program (power of two ≥ 16 for the MMA modes; the exact M ≤ 8
        for "reduce", which walks the rows one by one).
      bn: packed weight rows per program (power of two ≥ 16); a program writes 4·bn outputs.
      bk: input columns per inner-loop step (power of two ≥ 32).
      splits: number of K splits (third grid axis); partial sums are added in XLA.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K loop.
      dot: "int8", "bfloat16" or "reduce" (module docstring).
    """

    bm: int
    bn: int
    bk: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    dot: str = "int8"

    def __post_init__(self):
        if self.dot not in _DOT_MODES:
            raise ConfigError(f"BlockConfig.dot={self.dot!r} is unknown; use one of {_DOT_MODES}.")
        mma = self.dot != "reduce"
        if mma and not (_is_pow2(self.bm) and self.bm >= _MMA_MIN):
            raise ConfigError(
                f"BlockConfig.bm={self.bm} must be a power of two >= 16 for dot={self.dot!r}.")
        if not mma and not 1 <= self.bm <= _REDUCE_MAX_M:
            raise ConfigError(f"BlockConfig.bm={self.bm} must be 1..8 for dot='reduce'.")
        if not (_is_pow2(self.bn) and self.bn >= _MMA_MIN):
            raise ConfigError(f"BlockConfig.bn={self.bn} must be a power of two >= 16.")
        if not (_is_pow2(self.bk) and self.bk >= 32):
            raise ConfigError(f"BlockConfig.bk={self.bk} must be a power of two >= 32.")
        if self.splits < 1:
            raise ConfigError(f"BlockConfig.splits={self.splits} must be >= 1.")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, b: int) -> int:
    return -(-n // b) * b


def _fit_block(dims: Sequence[int], target: int, minimum: int) -> int:
    """Largest power-of-two block in [minimum, target] dividing every dim (no masked loads),
    else `target` (the last block is masked)."""
    if max(dims) <= target and len(dims) == 1:
        return max(minimum, _next_pow2(dims[0]))
    b = target
    while b >= minimum:
        if all(d % b == 0 for d in dims):
            return b
        b //= 2
    return target


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return next(d for d in range(max(1, min(n, cap)), 0, -1) if n % d == 0)


def select_variant(m: int) -> str:
    """The variant used for M activation rows: "gemv" for M ≤ 64 (decode), else "gemm"."""
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def default_config(m: int, r: int | Sequence[int], i: int, variant: str | None = None
                   ) -> BlockConfig:
    """Heuristic tiling for x [M, I] and packed weights with R_j = O_j/4 rows each. gemv (M ≤ 64): rows ≤ 4 use "reduce" (exact M rows, no padded MMA rows), more use an int8
    MMA over 16..64 padded rows; split-K adds programs (aiming at two per H100 SM) while the
    int32 partial sums stay under a quarter of the weight bytes. gemm (prefill): 2-D tiles, the
    full K loop per program. Untuned on hardware (benchmarks/gpu_check.sh sweeps them).

    Args:
      m: activation rows M.
      r: packed rows O/4 of the weight, or of each weight of a fused call.
      i: input features I.
      variant: "gemv" or "gemm"; None picks by M (`select_variant`).
    """
    rs = [r] if isinstance(r, int) else list(r)
    variant = variant or select_variant(m)
    if variant == "gemv":
        bn = _fit_block(rs, 32 if sum(rs) >= 64 * 32 else 16, _MMA_MIN)
        bk = _fit_block([i], 256, 32)
        rows = m if m <= _REDUCE_DEFAULT_M else max(_MMA_MIN, _next_pow2(m))
        blocks = sum(-(-x // bn) for x in rs)
        k_steps = -(-i // bk)
        # partial sums splits·rows·4·ΣR·4 bytes <= ΣR·I/4 bytes of weights
        by_bytes = max(1, i // (64 * rows))
        want = max(1, -(-_TARGET_PROGRAMS // blocks))
        splits = _largest_divisor_at_most(k_steps, min(want, by_bytes, max(1, k_steps // 2)))
        if m <= _REDUCE_DEFAULT_M:
            return BlockConfig(bm=m, bn=bn, bk=bk, splits=splits, dot="reduce")
        return BlockConfig(bm=rows, bn=bn, bk=bk, splits=splits, num_warps=4, num_stages=3)
    if variant == "gemm":
        bm = 64 if m <= 128 else 128
        return BlockConfig(bm=bm, bn=_fit_block(rs, 32, _MMA_MIN), bk=_fit_block([i], 64, 32),
                           splits=1, num_warps=8 if bm >= 128 else 4, num_stages=3)
    raise ConfigError(f"Unknown Pallas variant {variant!r}; use 'gemv' or 'gemm'.")


def resolve_interpret(interpret: bool | None) -> bool:
    """None -> compiled on a GPU target (kernels/gpu/platform.py), interpret mode elsewhere;
    False off a GPU, or compiled without the Triton backend, is an error (every Pallas kernel
    here resolves its mode through this)."""
    interp = not on_gpu() if interpret is None else bool(interpret)
    if not interp and not on_gpu():
        raise DeviceError(
            f"The compiled Pallas kernel needs a GPU but the target is {default_platform()!r}; "
            "pass interpret=True (or None) or use kernel='xla'/'ffi'.")
    if not interp and _pl_triton is None:
        raise DeviceError("This jax has no Pallas Triton backend, which the compiled kernel "
                          "needs; use kernel='xla' or install jax<=0.11.")
    return interp


def ternary_matmul_pallas(x_q: jax.Array, packed: jax.Array, layer=None, *,
                          interpret: bool | None = None, variant: str | None = None,
                          config: BlockConfig | None = None) -> jax.Array:
    """Exact int32 product of int8 activations and one packed ternary weight.

    Args:
      x_q: [M, I] int8 activations.
      packed: [O/4, I] uint8 codes (quant.py layout), or the stacked [L, O/4, I] with `layer`.
      layer: None, or an int32 scalar: use matrix `layer` of the stack, read in place.
      interpret, variant, config: as in `ternary_matmul_many_pallas`.

    Returns:
      [M, O] int32 = x_q · tᵀ, equal to `ternary_matmul_xla`.
    """
    return ternary_matmul_many_pallas(x_q, [packed], layer, interpret=interpret,
                                      variant=variant, config=config)[0]


def ternary_matmul_many_pallas(x_q: jax.Array, packed: Sequence[jax.Array], layer=None, *,
                               interpret: bool | None = None, variant: str | None = None,
                               config: BlockConfig | None = None) -> list[jax.Array]:
    """`ternary_matmul_pallas` of one x_q with several weights of the same I, in one call.

    Args:
      x_q: [M, I] int8 activations.
      packed: uint8 weights [O_j/4, I], or stacked [L, O_j/4, I] when `layer` is given.
      layer: None or an int32 scalar (the stacked weights' matrix to use, read in place).
      interpret: True runs Pallas interpret mode (any backend), False the compiled GPU kernel,
        None picks compiled when the target is a GPU (`default_platform`).
      variant: "gemv" or "gemm"; None chooses by M (`select_variant`).
      config: explicit tiling; None uses `default_config`.

    Returns:
      [[M, O_j] int32], one per weight.
    """
    packed = list(packed)
    want = 2 if layer is None else 3
    if x_q.ndim != 2 or not packed or any(w.ndim != want for w in packed):
        raise ConfigError(
            f"ternary_matmul_pallas needs x_q [M, I] and packed [O/4, I] (or [L, O/4, I] with a "
            f"layer); got shapes {x_q.shape} and {[w.shape for w in packed]} (fold leading dims "
            "into M first).")
    if x_q.dtype != jnp.int8 or any(w.dtype != jnp.uint8 for w in packed):
        raise ConfigError(f"ternary_matmul_pallas needs int8 activations and uint8 packed weights;"
                          f" got {x_q.dtype} and {[str(w.dtype) for w in packed]} (quantize with "
                          "quant.quantize_activations).")
    if any(w.shape[-1] != x_q.shape[1] for w in packed):
        raise ConfigError(f"ternary_matmul_pallas: x_q has I={x_q.shape[1]} but packed has "
                          f"I={[w.shape[-1] for w in packed]}.")
    m, i = x_q.shape
    rs = [w.shape[-2] for w in packed]
    if m == 0 or i == 0 or min(rs) == 0:
        return [jnp.zeros((m, 4 * r), jnp.int32) for r in rs]
    if config is None:
        config = default_config(m, rs, i, variant)
    elif variant is not None:
        raise ConfigError("Pass either variant or config to ternary_matmul_pallas, not both.")
    if config.dot == "reduce" and m > _REDUCE_MAX_M:
        raise ConfigError(f"dot='reduce' handles at most {_REDUCE_MAX_M} rows; got M={m}.")
    interp = resolve_interpret(interpret)
    if layer is None:
        packed, layer = [w[None] for w in packed], 0  # a leading L = 1: a free reshape
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return list(_matmul_many(x_q, tuple(packed), layer, config=config, interpret=interp))


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _matmul_many(x_q, ws: tuple, layer, *, config: BlockConfig, interpret: bool):
    m, i = x_q.shape
    reduce_mode = config.dot == "reduce"
    bm, bn, bk, splits = (m if reduce_mode else config.bm), config.bn, config.bk, config.splits
    ip = _round_up(i, bk * splits)
    rs = tuple(w.shape[1] for w in ws)
    masked = any(r % bn for r in rs) or ip != i
    if masked and interpret:  # interpret mode's dynamic slices clamp: give them padded arrays
        ws = tuple(jnp.pad(w, ((0, 0), (0, _round_up(r, bn) - r), (0, ip - i)))
                   for w, r in zip(ws, rs))
    mp = _round_up(m, bm)
    x_p = x_q if (mp, ip) == (m, i) else jnp.pad(x_q, ((0, mp - m), (0, ip - i)))
    ik = ip // splits  # K columns per split
    blocks = [-(-r // bn) for r in rs]
    bounds = tuple((sum(blocks[:j]), sum(blocks[:j + 1])) for j in range(len(ws)))
    rtot = sum(blocks) * bn
    kernel = functools.partial(_kernel, bounds=bounds, bk=bk, steps=ik // bk, ik=ik,
                               dot=config.dot, limits=(rs, i) if masked else None)
    compiler_params = None
    if not interpret:
        compiler_params = _pl_triton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages)
    out_shape = (splits, mp, 4, rtot)
    # Bytes this call moves in HBM: one layer of each weight, x once (re-reads hit L2), the
    # partial sums written once. hlo.py reads this instead of the stacked operands' full size.
    moved = sum(rs) * i + mp * ip + 4 * math.prod(out_shape) + 4
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.int32),
        grid=(mp // bm, sum(blocks), splits),
        in_specs=[pl.BlockSpec((1,), lambda mi, ri, si: (0,)),
                  pl.BlockSpec((bm, ik), lambda mi, ri, si: (mi, si))]
        + [pl.BlockSpec(w.shape, lambda mi, ri, si: (0, 0, 0)) for w in ws],
        out_specs=pl.BlockSpec((None, bm, 4, bn), lambda mi, ri, si: (si, mi, 0, ri)),
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"ternary_matmul_{config.dot}_x{len(ws)}",
        metadata={"bytes_accessed": str(moved), "kernel": "ternary_matmul",
                  "weights": str(len(ws)), "stacked_layers": str(ws[0].shape[0])},
    )(layer, x_p, *ws)
    acc = out[0] if splits == 1 else out.sum(axis=0, dtype=jnp.int32)  # [Mp, 4, Rtot]
    res, start = [], 0
    for r, nb in zip(rs, blocks):
        res.append(acc[:m, :, start:start + r].reshape(m, 4 * r))
        start += nb * bn
    return tuple(res)


def _codes(p: jax.Array, plane: int) -> jax.Array:
    """Plane `plane` of a packed uint8 tile as int8 codes c' = t + 1 ∈ {0, 1, 2} (3 -> 1)."""
    c = p if plane == 0 else p >> jnp.uint8(2 * plane)
    c = c & jnp.uint8(3)
    c = jnp.where(c == jnp.uint8(3), jnp.uint8(1), c)
    return c.astype(jnp.int8)


def _kernel(layer_ref, x_ref, *refs, bounds, bk: int, steps: int, ik: int, dot: str, limits):
    """One [bm, 4, bn] output block: x_ref [bm, ik] int8 (this split's columns), the stacked
    weights [L, R_j, I] uint8 (whole, read at `layer`), o_ref [bm, 4, bn] int32. `limits`:
    None, or (R_j per weight, I) when loads must be masked."""
    *w_refs, o_ref = refs
    rb, si = pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    body = _reduce_block if dot == "reduce" else _mma_block
    for j, (w_ref, (lo, hi)) in enumerate(zip(w_refs, bounds)):
        tile = functools.partial(_weight_tile, w_ref, layer, rb - lo, si, bn=o_ref.shape[-1],
                                 bk=bk, ik=ik,
                                 limit=None if limits is None else (limits[0][j], limits[1]))
        if len(w_refs) == 1:
            body(x_ref, tile, o_ref, bk=bk, steps=steps, dot=dot)
        else:
            pl.when((rb >= lo) & (rb < hi))(
                functools.partial(body, x_ref, tile, o_ref, bk=bk, steps=steps, dot=dot))


def _weight_tile(w_ref, layer, rblock, si, k, *, bn: int, bk: int, ik: int, limit):
    """The [bn, bk] uint8 tile at k-step k; rows >= R or columns >= I read as 0 with `limit`."""
    r0 = pl.multiple_of(rblock * bn, bn)
    k0 = pl.multiple_of(si * ik + k * bk, bk)
    view = w_ref.at[layer, pl.ds(r0, bn), pl.ds(k0, bk)]
    if limit is None:
        return view[...]
    rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (bn, bk), 0)
    cols = k0 + jax.lax.broadcasted_iota(jnp.int32, (bn, bk), 1)
    mask = (rows < limit[0]) & (cols < limit[1])
    return _pl_triton.load(view, mask=mask, other=0)


def _mma_block(x_ref, tile, o_ref, *, bk, steps, dot):
    bm, bn = x_ref.shape[0], o_ref.shape[-1]
    nt = (((1,), (1,)), ((), ()))  # contract the last axis of both: x · cᵀ

    def step(k, carry):
        accs, xs = carry
        x = x_ref[:, pl.ds(pl.multiple_of(k * bk, bk), bk)]  # [bm, bk] int8
        p = tile(k)
        xs = xs + jnp.sum(x.astype(jnp.int32), axis=1)
        if dot == "bfloat16":
            x = x.astype(jnp.bfloat16)
        new = []
        for plane in range(4):
            c = _codes(p, plane)
            if dot == "int8":
                part = jax.lax.dot_general(x, c, nt, preferred_element_type=jnp.int32)
            else:  # bf16 holds int8 and {0,1,2} exactly; one step's sum is < 2^24, so exact.
                part = jax.lax.dot_general(x, c.astype(jnp.bfloat16), nt,
                                           preferred_element_type=jnp.float32).astype(jnp.int32)
            new.append(accs[plane] + part)
        return tuple(new), xs

    zeros = jnp.zeros((bm, bn), jnp.int32)
    accs, xs = jax.lax.fori_loop(0, steps, step, ((zeros,) * 4, jnp.zeros((bm,), jnp.int32)))
    for plane in range(4):
        o_ref[:, plane, :] = accs[plane] - xs[:, None]


def _reduce_block(x_ref, tile, o_ref, *, bk, steps, dot):
    """As `_mma_block` with multiply + row sums per activation row (no tensor cores)."""
    del dot
    bm, bn = x_ref.shape[0], o_ref.shape[-1]

    def step(k, carry):
        accs, xs = carry
        start = pl.multiple_of(k * bk, bk)
        p = tile(k)
        codes = [_codes(p, plane).astype(jnp.int32) for plane in range(4)]
        new, new_xs = [], []
        for row in range(bm):
            x = x_ref[row, pl.ds(start, bk)].astype(jnp.int32)  # [bk]
            new_xs.append(xs[row] + jnp.sum(x))
            for plane in range(4):
                new.append(accs[4 * row + plane] + jnp.sum(codes[plane] * x[None, :], axis=1))
        return tuple(new), tuple(new_xs)

    zeros = jnp.zeros((bn,), jnp.int32)
    init = ((zeros,) * (4 * bm), (jnp.zeros((), jnp.int32),) * bm)
    accs, xs = jax.lax.fori_loop(0, steps, step, init)
    for row in range(bm):
        for plane in range(4):
            o_ref[row, plane, :] = accs[4 * row + plane] - xs[row]
