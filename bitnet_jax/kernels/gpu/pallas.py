"""Pallas GPU kernel for the packed ternary matmul (2-bit weights, int8 activations).

`ternary_matmul_pallas(x_q [M, I] int8, packed [O/4, I] uint8) -> [M, O] int32` is exact and
must equal `bitnet_jax.kernels.xla.ternary_matmul_xla` bit for bit.

Layout (bitlinear.py, spec §1.3): bits 2i..2i+1 of packed row r hold original output row
r + i·O/4 as the code t+1 ∈ {0, 1, 2}; code 3 never occurs in valid data and means 0. So one
packed tile [bn, bk] feeds four output strips, and the kernel writes the output viewed as
[M, 4, O/4]: out[:, i, r] = Σ_k x[:, k]·t[r + i·O/4, k]. The weight is read once, as bytes.

Arithmetic. Each plane is unpacked in registers to codes c' ∈ {0, 1, 2} (shift, mask, and a
select that maps code 3 to 1), multiplied against the raw int8 activations, and the row sums of
x are subtracted once in the epilogue: Σ x·(c'−1) = Σ x·c' − Σ x. Padding bytes are code 0, so
they contribute nothing whatever x holds. The products run on the tensor cores as int8 × int8 →
int32 (exact by construction); `dot="bfloat16"` instead runs bf16 × bf16 → f32 per k-step and
adds the step results in int32, which is also exact because one step's partial sum is at most
2·128·bk < 2^24. `dot="reduce"` uses elementwise multiply + row reduction (CUDA cores, no
tensor cores), meant for M ≤ 8, where a 16-row MMA would mostly multiply padding.

Two variants, chosen from M at trace time (`select_variant`):
  gemv   M ≤ 64 (decode): all rows in one block (padded to 16 for the MMA), narrow weight tiles,
         and split-K over a third grid axis so that even 2560-wide layers launch a few hundred
         programs; the per-split partial sums are added in XLA (int32, exact).
  gemm   M > 64 (prefill): classic 2-D tiling over (M, O/4), full K loop per program.
Shapes that are not block multiples are zero-padded in the wrapper and the result sliced; the
block pickers prefer power-of-two blocks that divide the real dimensions so the BitNet-2B4T
weights (O/4 ∈ {160, 640, 1728}, I ∈ {2560, 6912}) are never copied.

Lowering (facts read in jax 0.10.2's source, jax/_src/pallas/pallas_call.py `gpu_lowering`,
mosaic_gpu/lowering.py, triton/lowering.py, and the Pallas changelog/quickstart):
  * A `pl.pallas_call` with no `compiler_params` lowers to **Mosaic GPU** on CUDA (config flag
    `jax_pallas_use_mosaic_gpu`, default True since jax 0.9) and warns that `pallas_call` for
    Mosaic GPU is deprecated in favour of `plgpu.kernel`. Mosaic GPU has **no `dot_general`
    lowering rule**: matmuls must be written with `plgpu.wgmma` on swizzled SMEM refs, and its
    register arrays support reductions/broadcasts only for particular layouts. A portable
    jnp-style kernel body therefore cannot lower there.
  * Passing `compiler_params=pallas.triton.CompilerParams(num_warps, num_stages)` selects the
    **Triton** lowering, which has rules for dot_general (int8 × int8 → int32 accumulate; it
    rejects unsigned operands, hence the int8 codes), shifts, bitwise ops, converts, select,
    reduce_sum, broadcasts, fori_loop (scf.for, software-pipelined by `num_stages`) and ref
    loads/stores with dynamic `pl.ds` slices and integer indices. Every loaded/stored tensor
    must have a power-of-two element count, and Triton's dot needs every dim ≥ 16. Grid axes
    are all parallel (at most 3), so the K reduction is an in-kernel loop. The Triton backend
    is deprecated in jax 0.11.0 ("will be removed in a future version") but still ships; the
    quickstart calls it best-effort. This module uses it; a Mosaic GPU (wgmma) port is the
    follow-up when Triton goes away.
  * `interpret=True` runs the kernel as a jitted scan over the grid on any backend (the only way
    to run Pallas on CPU); `compiler_params` is ignored there.

Verified here (CPU, jax 0.10.2): interpret-mode parity with the XLA path for odd and extreme
shapes, all three dot modes, split-K and both variants (tests/test_kernels_pallas.py), and that
the kernels lower to Triton IR for CUDA (`jit(...).trace(...).lower(lowering_platforms=("cuda",))`
needs no GPU with jaxlib 0.10.2, which hands the IR to XLA; with a newer jaxlib jax compiles it
to PTX while lowering, for sm_90 when no GPU is visible, with the CUDA plugin's Triton compiler).
Still needs a GPU run (benchmarks/gpu_check.sh): Triton IR → PTX compilation under jax 0.11.2 /
CUDA 13, compiled parity, and the block configs' speed (the defaults below are untuned guesses).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitnet_jax.errors import ConfigError, DeviceError

try:  # The Triton backend is deprecated in jax 0.11 and may disappear from a later release.
    from jax.experimental.pallas import triton as _pl_triton
except ImportError:  # pragma: no cover - depends on the installed jax
    _pl_triton = None

GEMV_MAX_M = 64
_DOT_MODES = ("int8", "bfloat16", "reduce")
_REDUCE_MAX_M = 8
_MMA_MIN = 16  # Triton's dot needs every dimension >= 16.
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tiling of one pallas_call; frozen so it can be a static jit argument.

    Attributes:
      bm: activation rows per program (power of two ≥ 16 for the MMA modes; any size ≤ 8 for
        "reduce", which walks the rows one by one).
      bn: packed weight rows per program (power of two ≥ 16); a program writes 4·bn outputs.
      bk: input columns per inner-loop step (power of two ≥ 32).
      splits: number of K splits (third grid axis); partial sums are added in XLA.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the K loop.
      dot: "int8" (int8 MMA, int32 accumulate), "bfloat16" (bf16 MMA, f32 per step) or
        "reduce" (elementwise multiply + row sums, no MMA).
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


def _fit_block(dim: int, target: int, minimum: int) -> int:
    """Largest power-of-two block in [minimum, target] dividing `dim`, else one to pad to.

    Dividing blocks avoid copying the (large) weight to pad it on every call.
    """
    if dim <= target:
        return max(minimum, _next_pow2(dim))
    b = target
    while b >= minimum:
        if dim % b == 0:
            return b
        b //= 2
    return target


def _largest_divisor_at_most(n: int, cap: int) -> int:
    for d in range(max(1, min(n, cap)), 0, -1):
        if n % d == 0:
            return d
    return 1


def select_variant(m: int) -> str:
    """The variant used for M activation rows: "gemv" for M ≤ 64 (decode), else "gemm"."""
    return "gemv" if m <= GEMV_MAX_M else "gemm"


def default_config(m: int, r: int, i: int, variant: str | None = None) -> BlockConfig:
    """Heuristic tiling for x [M, I] and packed [R = O/4, I]. Untuned: see gpu_check.sh.

    Args:
      m: activation rows M.
      r: packed weight rows O/4.
      i: input features I.
      variant: "gemv" or "gemm"; None picks by M (`select_variant`).

    Returns:
      A BlockConfig.
    """
    variant = variant or select_variant(m)
    if variant == "gemv":
        bm = max(_MMA_MIN, _next_pow2(m))
        bn = _fit_block(r, 32 if r >= 64 * 32 else 16, _MMA_MIN)
        bk = _fit_block(i, 256, 32)
        # Aim for ~2 programs per SM of an H100 (132 SMs); each split keeps >= 2 k-steps.
        r_blocks = -(-r // bn)
        k_steps = -(-i // bk)
        want = max(1, -(-264 // r_blocks))
        splits = _largest_divisor_at_most(k_steps, min(want, max(1, k_steps // 2)))
        return BlockConfig(bm=bm, bn=bn, bk=bk, splits=splits, num_warps=4, num_stages=3)
    if variant == "gemm":
        bm = 64 if m <= 128 else 128
        bn = _fit_block(r, 32, _MMA_MIN)
        bk = _fit_block(i, 64, 32)
        return BlockConfig(bm=bm, bn=bn, bk=bk, splits=1,
                           num_warps=8 if bm >= 128 else 4, num_stages=3)
    raise ConfigError(f"Unknown Pallas variant {variant!r}; use 'gemv' or 'gemm'.")


def _resolve_interpret(interpret: bool | None) -> bool:
    platform = jax.default_backend()
    if interpret is None:
        return platform not in _GPU_PLATFORMS
    if not interpret and platform not in _GPU_PLATFORMS:
        raise DeviceError(
            f"The compiled Pallas kernel needs a GPU but the default backend is {platform!r}; "
            "pass interpret=True (or None) or use kernel='xla'/'ffi'."
        )
    return bool(interpret)


def ternary_matmul_pallas(
    x_q: jax.Array,
    packed: jax.Array,
    *,
    interpret: bool | None = None,
    variant: str | None = None,
    config: BlockConfig | None = None,
) -> jax.Array:
    """Exact int32 product of int8 activations and packed 2-bit ternary weights.

    Args:
      x_q: [M, I] int8 activations.
      packed: [O/4, I] uint8 codes in the bitlinear.py layout.
      interpret: True runs Pallas interpret mode (any backend), False the compiled GPU kernel,
        None picks compiled on GPU and interpret elsewhere.
      variant: "gemv" or "gemm"; None chooses by M (`select_variant`).
      config: explicit tiling; None uses `default_config`.

    Returns:
      [M, O] int32 = x_q · tᵀ, equal to `ternary_matmul_xla`.
    """
    if x_q.ndim != 2 or packed.ndim != 2:
        raise ConfigError(
            f"ternary_matmul_pallas needs x_q [M, I] and packed [O/4, I]; got shapes "
            f"{x_q.shape} and {packed.shape} (fold leading dims into M first).")
    if x_q.dtype != jnp.int8 or packed.dtype != jnp.uint8:
        raise ConfigError(
            f"ternary_matmul_pallas needs int8 activations and uint8 packed weights; got "
            f"{x_q.dtype} and {packed.dtype} (quantize with bitlinear.quantize_activations).")
    if x_q.shape[1] != packed.shape[1]:
        raise ConfigError(
            f"ternary_matmul_pallas: x_q has I={x_q.shape[1]} but packed has I={packed.shape[1]}.")
    m, i = x_q.shape
    r = packed.shape[0]
    if m == 0 or r == 0 or i == 0:
        return jnp.zeros((m, 4 * r), jnp.int32)
    if config is None:
        config = default_config(m, r, i, variant)
    elif variant is not None:
        raise ConfigError("Pass either variant or config to ternary_matmul_pallas, not both.")
    if config.dot == "reduce" and m > _REDUCE_MAX_M:
        raise ConfigError(f"dot='reduce' handles at most {_REDUCE_MAX_M} rows; got M={m}.")
    interp = _resolve_interpret(interpret)
    if not interp and _pl_triton is None:
        raise DeviceError(
            "This jax has no Pallas Triton backend, which the compiled kernel needs; "
            "use kernel='xla' or install jax<=0.11.")
    return _ternary_matmul(x_q, packed, config=config, interpret=interp)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _ternary_matmul(x_q, packed, *, config: BlockConfig, interpret: bool):
    m, i = x_q.shape
    r = packed.shape[0]
    reduce_mode = config.dot == "reduce"
    bm = m if reduce_mode else config.bm
    mp = _round_up(m, bm)
    rp = _round_up(r, config.bn)
    ip = _round_up(i, config.bk * config.splits)
    ik = ip // config.splits  # K columns per split
    steps = ik // config.bk

    x_p = x_q if (mp, ip) == (m, i) else jnp.pad(x_q, ((0, mp - m), (0, ip - i)))
    w_p = packed if (rp, ip) == (r, i) else jnp.pad(packed, ((0, rp - r), (0, ip - i)))
    # Row sums of x per split, subtracted in the kernel epilogue (codes c' = t + 1).
    xsum = x_p.astype(jnp.int32).reshape(mp, config.splits, ik).sum(axis=-1).T  # [S, Mp]

    grid = (mp // bm, rp // config.bn, config.splits)
    kernel = functools.partial(
        _reduce_kernel if reduce_mode else _mma_kernel, bk=config.bk, steps=steps,
        dot=config.dot)
    compiler_params = None
    if not interpret:
        compiler_params = _pl_triton.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((config.splits, mp, 4, rp), jnp.int32),
        grid=grid,
        in_specs=[
            pl.BlockSpec((bm, ik), lambda mi, ri, si: (mi, si)),
            pl.BlockSpec((config.bn, ik), lambda mi, ri, si: (ri, si)),
            pl.BlockSpec((None, bm), lambda mi, ri, si: (si, mi)),
        ],
        out_specs=pl.BlockSpec((None, bm, 4, config.bn), lambda mi, ri, si: (si, mi, 0, ri)),
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"ternary_matmul_{config.dot}",
    )(x_p, w_p, xsum)
    out = out[0] if config.splits == 1 else out.sum(axis=0, dtype=jnp.int32)
    return out[:m, :, :r].reshape(m, 4 * r)


def _codes(p: jax.Array, plane: int) -> jax.Array:
    """Plane `plane` of a packed uint8 tile as int8 codes c' = t + 1 ∈ {0, 1, 2} (3 -> 1)."""
    c = p if plane == 0 else p >> jnp.uint8(2 * plane)
    c = c & jnp.uint8(3)
    c = jnp.where(c == jnp.uint8(3), jnp.uint8(1), c)
    return c.astype(jnp.int8)


def _mma_kernel(x_ref, w_ref, xs_ref, o_ref, *, bk: int, steps: int, dot: str):
    """One [bm, 4, bn] output block: x_ref [bm, Ik] int8, w_ref [bn, Ik] uint8, xs_ref [bm]."""
    bm, bn = x_ref.shape[0], w_ref.shape[0]
    nt = (((1,), (1,)), ((), ()))  # contract the last axis of both: x · cᵀ

    def step(k, accs):
        start = pl.multiple_of(k * bk, bk)
        x = x_ref[:, pl.ds(start, bk)]
        p = w_ref[:, pl.ds(start, bk)]
        if dot == "bfloat16":
            x = x.astype(jnp.bfloat16)
        new = []
        for plane in range(4):
            c = _codes(p, plane)
            if dot == "int8":
                part = jax.lax.dot_general(x, c, nt, preferred_element_type=jnp.int32)
            else:  # bf16 holds int8 and {0,1,2} exactly; one step's sum is < 2^24, so exact.
                part = jax.lax.dot_general(x, c.astype(jnp.bfloat16), nt,
                                           preferred_element_type=jnp.float32)
                part = part.astype(jnp.int32)
            new.append(accs[plane] + part)
        return tuple(new)

    zeros = jnp.zeros((bm, bn), jnp.int32)
    accs = jax.lax.fori_loop(0, steps, step, (zeros,) * 4)
    xs = xs_ref[...][:, None]
    for plane in range(4):
        o_ref[:, plane, :] = accs[plane] - xs


def _reduce_kernel(x_ref, w_ref, xs_ref, o_ref, *, bk: int, steps: int, dot: str):
    """As `_mma_kernel` but with multiply + row sums per activation row (no tensor cores)."""
    del dot
    bm, bn = x_ref.shape[0], w_ref.shape[0]

    def step(k, accs):
        start = pl.multiple_of(k * bk, bk)
        p = w_ref[:, pl.ds(start, bk)]
        codes = [_codes(p, plane).astype(jnp.int32) for plane in range(4)]
        new = []
        for row in range(bm):
            x = x_ref[row, pl.ds(start, bk)].astype(jnp.int32)[None, :]  # [1, bk]
            for plane in range(4):
                new.append(accs[4 * row + plane] + jnp.sum(codes[plane] * x, axis=1))
        return tuple(new)

    zeros = jnp.zeros((bn,), jnp.int32)
    accs = jax.lax.fori_loop(0, steps, step, (zeros,) * (4 * bm))
    for row in range(bm):
        xs = xs_ref[row]
        for plane in range(4):
            o_ref[row, plane, :] = accs[4 * row + plane] - xs
