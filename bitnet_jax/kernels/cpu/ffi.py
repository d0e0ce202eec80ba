"""The CPU kernels as JAX functions: one XLA custom call each, through `jax.ffi`.

`ternary_matmul_ffi(x_q [M, I] int8, packed [O/4, I] uint8) -> [M, O] int32` is exact and agrees
bit for bit with `ternary_matmul_xla`. The C++ reads the packed bytes directly (2 bits per
weight), so a decode step streams 4x fewer weight bytes than the XLA int8 path and skips its
in-graph unpack (jax-notes §2.2, §2.3): a GEMV for M = 1 (ternary_paths.h) and, on AVX-512 VNNI,
a GEMM for M >= 2 (ternary_gemm.h), chosen in the C++ by M. With `layer`, `packed` is the stacked
[L, O/4, I] array of all layers and the kernel reads matrix `layer` in place: inside `lax.scan`
XLA would otherwise copy each layer's slice before the custom call (7 MB per layer of the large
model).

`ternary_linear_many_ffi(x [M, I] float, packed, scales) -> [M, O_j] float32` is BitLinear in
one call: the per-token int8 quantisation of x, the same kernels, and the scaling by step · scale
(quantize_cpu.h), so that no XLA op runs around the product (same codes and int32 products as
the unfused ops; the float scaling to a few ulp). cpu/fused.py adds the layer's RMSNorm
before it and the residual add or act(gate) · up after it to the same call.

`int8_matmul_ffi(x_q [M, I] int8, w [V, I] int8) -> [M, V] int32` is the int8 LM head
(params.quantize_lm_head; int8_cpu.h GEMV, int8_gemm.h GEMM for M >= 2 on AVX-512 VNNI), exact
and equal to XLA's int8 dot.

`attention_ffi(q, k, v, layer, rows, pos)` attends over the visible positions of one layer of
the stacked KV cache (float32, float16, bfloat16 or int8 rows) in place (attention_cpu.h); it
equals attention.attend on the same cache up to float rounding.

library.py loads the shared object and chooses its kernel path; its public functions
(`available`, `unavailable_reason`, `isa`, `supported_isas`, `set_isa`) are re-exported here.
When the library is not available the two matmuls compute the same result through the XLA path,
`ternary_matmul_kernel` and `attention_ffi` raise KernelError, and `attention_usable` is False.

Transformations:
  * jit: the call is one XLA custom call, run on XLA's thread and on helper threads, one per
    further core of XLA's pool (ffi_runtime.h).
  * vmap: a `custom_vmap` rule folds batch axes into M (one kernel call for the whole batch).
  * grad: the integer matmuls need none: both operands are integers, so JAX gives them
    symbolic-zero (float0) tangents and never differentiates through the call; gradients of
    `bitlinear` with a packed leaf (w.r.t. `scale`, or x through the activation step) are the
    same as on the XLA path. A custom_vjp that raised would never run, or would break that
    parity. `ternary_linear_many_ffi` (float x and scales) has a custom JVP that differentiates
    the unfused ops. QAT trains latent float weights (bitlinear.py) and packs them afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.errors import KernelError
from bitnet_jax.kernels.cpu.library import (
    ATTENTION_TARGET,
    INT8_LINEAR_TARGET,
    INT8_TARGET,
    LINEAR_TARGET,
    ISAS,
    TARGET,
    available,
    isa,
    require_library,
    set_isa,
    supported_isas,
    unavailable_reason,
)
from bitnet_jax.kernels.xla import int8_matmul_xla, ternary_matmul_xla
from bitnet_jax.quant import dequantize_products, quantize_activations

__all__ = ["ISAS", "KernelError", "attention_ffi", "attention_usable", "available",
           "int8_matmul_ffi", "isa", "set_isa", "supported_isas", "ternary_matmul_ffi",
           "ternary_linear_many_ffi", "ternary_matmul_kernel", "ternary_matmul_many_ffi",
           "unavailable_reason"]


# ------------------------------------------------------------------------------------------------
# The kernel as a JAX function


def _check(x_q: jax.Array, packed: jax.Array, layer, int8: bool = True) -> None:
    """Operands of one packed product; `int8=False`: x is float (the fused linear)."""
    wrank = 3 if layer is not None else 2
    if x_q.ndim != 2 or packed.ndim != wrank or x_q.shape[1] != packed.shape[-1]:
        want = "[L, O/4, I] with a layer index" if layer is not None else "[O/4, I]"
        raise KernelError(
            f"ternary_matmul needs x_q [M, I] and packed {want} with the same I; got "
            f"{x_q.shape} and {packed.shape}."
        )
    if (int8 and x_q.dtype != jnp.int8) or packed.dtype != jnp.uint8:
        raise KernelError(
            f"ternary_matmul needs int8 activations and uint8 packed weights; got {x_q.dtype} "
            f"and {packed.dtype} (quantize with bitlinear.quantize_activations / pack_weights)."
        )
    _check_backend()


def _check_backend() -> None:
    if jax.default_backend() != "cpu":
        raise KernelError(
            f"kernel='ffi' runs on CPU only, but JAX's default backend is "
            f"{jax.default_backend()!r}; use kernel='auto' or 'pallas' there."
        )


def _layer_operand(layer) -> jax.Array:
    return jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)


def _packed_call(target: str, dtype, x: jax.Array, layer: jax.Array, extra: tuple,
                 packed: tuple, outputs: int | None = None, vmap_method: str | None = None,
                 **attrs) -> tuple:
    """One custom call of `target`: x [M, I], the layer index, `extra` operands, then the weights
    [(L,) O_j/4, I] -> tuple of [M, O_j] `dtype` (zeros without a call when a size is 0), the
    first `outputs` of them only when given (cpu/fused.py's act(gate) · up); attrs: the call's
    attributes."""
    m = x.shape[0]
    outs = tuple(jax.ShapeDtypeStruct((m, 4 * w.shape[-2]), dtype) for w in packed)[:outputs]
    if m == 0 or any(w.shape[-2] == 0 for w in packed):
        return tuple(jnp.zeros(o.shape, dtype) for o in outs)
    call = jax.ffi.ffi_call(target, outs, vmap_method=vmap_method)
    return tuple(call(x, layer, *extra, *packed, **attrs))


def linear_attrs(eps: float = 0.0, norm: bool = False, residual: bool = False,
                 act: int = 0) -> dict:
    """The attributes of a bitnet_ternary_linear call (all off: the bare fused linear)."""
    return dict(eps=np.float32(eps), norm=np.int32(norm), residual=np.int32(residual),
                act=np.int32(act))


def _ffi_matmul(x_q: jax.Array, layer: jax.Array, *packed: jax.Array) -> tuple:
    """x_q [M, I] int8 times each [(L,) O_j/4, I] -> tuple of [M, O_j] int32."""
    return _packed_call(TARGET, jnp.int32, x_q, layer, (), packed)


@jax.custom_batching.custom_vmap
def _batchable(x_q: jax.Array, layer: jax.Array, *packed: jax.Array) -> tuple:
    return _ffi_matmul(x_q, layer, *packed)


def _rows_vmap_rule(kernel):
    """custom_vmap rule for a kernel whose first operand is x [M, I] and whose outputs are
    [M, ...] (one array or a tuple): batch axes of x fold into M, so one call serves the whole
    batch. Batched weights (or layer index) cannot share a call: one call per example."""
    def rule(axis_size, in_batched, x, *rest):
        # custom_vmap hands batched operands with the batch axis first.
        if any(in_batched[1:]):
            args = [a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
                    for a, batched in zip((x, *rest), in_batched)]
            outs = jax.lax.map(lambda a: kernel(*a), tuple(args))
        else:
            b, m, i = x.shape
            outs = jax.tree.map(lambda o: o.reshape(b, m, o.shape[-1]),
                                kernel(x.reshape(b * m, i), *rest))
        return outs, jax.tree.map(lambda _: True, outs)

    return rule


_batchable.def_vmap(_rows_vmap_rule(_batchable))


def ternary_matmul_kernel(x_q: jax.Array, packed: jax.Array, layer=None) -> jax.Array:
    """The FFI kernel itself, whatever M is (raises KernelError if it is not available).

    Args:
      x_q: [M, I] int8 activations.
      packed: [O/4, I] uint8 codes in the bitlinear.py layout, or [L, O/4, I] with `layer`.
      layer: int32 scalar, which of the L stacked matrices to use (None: packed is 2-D).

    Returns:
      [M, O] int32 = x_q · tᵀ.
    """
    _check(x_q, packed, layer)
    require_library()
    return _batchable(x_q, _layer_operand(layer), packed)[0]


def ternary_matmul_ffi(x_q: jax.Array, packed: jax.Array, layer=None) -> jax.Array:
    """Exact int32 product of int8 activations and packed ternary weights on CPU.

    Uses the FFI kernel when it is available, else the XLA path (identical results). The kernel
    is used at every M: on the 2-core AVX2 dev box (benchmarks/bench_bitlinear.py) it took 2-7x
    less CPU time than the XLA path from M=1 to M=128, since XLA unpacks the whole weight to
    int8 in a separate fusion on every call before its int8 dot. M >= 2 runs the GEMM kernel
    on AVX-512 VNNI CPUs (benchmarks/README.md, CPU GEMM).

    Args:
      x_q: [M, I] int8 activations.
      packed: [O/4, I] uint8 codes in the bitlinear.py layout, or [L, O/4, I] with `layer`.
      layer: int32 scalar, which of the L stacked matrices to use (None: packed is 2-D).

    Returns:
      [M, O] int32 = x_q · tᵀ.
    """
    return ternary_matmul_many_ffi(x_q, [packed], layer)[0]


def ternary_matmul_many_ffi(x_q: jax.Array, packed: list, layer=None) -> list:
    """`ternary_matmul_ffi` for several weights that share x_q (q/k/v, gate/up) in one call.

    Args:
      x_q: [M, I] int8 activations.
      packed: list of [O_j/4, I] (or [L, O_j/4, I] with `layer`) uint8 weights.
      layer: int32 scalar or None, as in `ternary_matmul_ffi`.

    Returns:
      list of [M, O_j] int32.
    """
    for w in packed:
        _check(x_q, w, layer)
    if not available():
        if layer is not None:
            packed = [jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False) for w in packed]
        return [ternary_matmul_xla(x_q, w) for w in packed]
    return list(_batchable(x_q, _layer_operand(layer), *packed))


# ------------------------------------------------------------------------------------------------
# BitLinear in one call: quantise, matmul, dequantise (the kernel's float32 entry)


def _ffi_linear(x: jax.Array, layer: jax.Array, *scales_and_packed: jax.Array) -> tuple:
    """x [M, I] float32, n scales, n weights -> tuple of [M, O_j] float32 (the fused linear)."""
    n = len(scales_and_packed) // 2
    return _packed_call(LINEAR_TARGET, jnp.float32, x, layer, scales_and_packed[:n],
                        scales_and_packed[n:], **linear_attrs())


@jax.custom_batching.custom_vmap
def _linear_batchable(x: jax.Array, layer: jax.Array, *scales_and_packed: jax.Array) -> tuple:
    return _ffi_linear(x, layer, *scales_and_packed)


_linear_batchable.def_vmap(_rows_vmap_rule(_linear_batchable))


def _linear_composed(x: jax.Array, layer: jax.Array, *scales_and_packed: jax.Array) -> tuple:
    """What the fused call computes, as separate ops (bitlinear_many's unfused sequence)."""
    n = len(scales_and_packed) // 2
    scales, packed = scales_and_packed[:n], scales_and_packed[n:]
    x_q, step = quantize_activations(x)
    accs = _batchable(x_q, layer, *packed)
    return tuple(dequantize_products(acc, step, s if s.ndim == 0 else s[layer])
                 for acc, s in zip(accs, scales))


@jax.custom_jvp
def _linear(x: jax.Array, layer: jax.Array, *scales_and_packed: jax.Array) -> tuple:
    return _linear_batchable(x, layer, *scales_and_packed)


@_linear.defjvp
def _linear_jvp(primals, tangents):
    # Differentiated (QAT on a packed leaf, gradients w.r.t. x or the scales): the same ops as
    # the unfused path, so gradients are unchanged by the fusion.
    return jax.jvp(_linear_composed, primals, tangents)


def ternary_linear_many_ffi(x: jax.Array, packed: list, scales: list, layer=None) -> list:
    """BitLinear's packed product for several weights sharing x, in ONE kernel call.

    The call quantises x per token (absmax int8, quant.quantize_activations), multiplies by
    every packed weight and scales the int32 products by step · scale_j (cpu/quantize_cpu.h),
    so none of those steps is a separate XLA op: issue 16's per-layer glue. The int8 codes and
    so the int32 products are quantize_activations' and `ternary_matmul_many_ffi`'s exactly;
    the float32 scaling equals bitlinear_many's in XLA to a few ulp (XLA reorders it by shape).
    Needs the library (`available()`).

    Args:
      x: [M, I] activations (any float dtype; quantised from float32).
      packed: list of [O_j/4, I] (or [L, O_j/4, I] with `layer`) uint8 weights.
      scales: each weight's dequantisation scale: a scalar, or the [L] scales of the stack with
        `layer` (the kernel reads entry `layer`, so no slice is computed outside it).
      layer: int32 scalar or None, as in `ternary_matmul_ffi`.

    Returns:
      list of [M, O_j] float32.
    """
    scales = linear_operands("ternary_linear_many_ffi", x, packed, scales, layer)
    return list(_linear(x.astype(jnp.float32), _layer_operand(layer), *scales, *packed))


def linear_operands(who: str, x: jax.Array, packed: list, scales: list, layer) -> list:
    """Checks of a fused linear's x and weights (and that the library is loaded); its scales
    as float32 [] or [L] (with `layer`) arrays."""
    for w in packed:
        _check(x, w, layer, int8=False)
    require_library()
    scales = [jnp.asarray(s, jnp.float32) for s in scales]
    if any(s.ndim > 1 or (s.ndim == 1 and layer is None) for s in scales):
        raise KernelError(f"{who} takes scalar scales, or [L] scales with a layer index; got "
                          f"shapes {[s.shape for s in scales]}.")
    return scales


# ------------------------------------------------------------------------------------------------
# The int8 LM head


def _ffi_int8(x_q: jax.Array, w: jax.Array) -> jax.Array:
    m, v = x_q.shape[0], w.shape[0]
    if m == 0 or v == 0:
        return jnp.zeros((m, v), jnp.int32)
    return jax.ffi.ffi_call(INT8_TARGET, jax.ShapeDtypeStruct((m, v), jnp.int32))(x_q, w)


@jax.custom_batching.custom_vmap
def _int8_batchable(x_q: jax.Array, w: jax.Array) -> jax.Array:
    return _ffi_int8(x_q, w)


_int8_batchable.def_vmap(_rows_vmap_rule(_int8_batchable))


def int8_matmul_ffi(x_q: jax.Array, w: jax.Array) -> jax.Array:
    """Exact int32 product of int8 activations and an int8 [V, I] matrix (the LM head) on CPU.

    Uses the FFI kernel when it is available, else XLA's int8 dot (identical results).

    Args:
      x_q: [M, I] int8 activations.
      w: [V, I] int8 weights in [-127, 127] (params.quantize_lm_head; -128 is not allowed).

    Returns:
      [M, V] int32 = x_q · wᵀ.
    """
    if x_q.ndim != 2 or w.ndim != 2 or x_q.shape[1] != w.shape[1]:
        raise KernelError(f"int8_matmul needs x_q [M, I] and w [V, I] with the same I; got "
                          f"{x_q.shape} and {w.shape}.")
    if x_q.dtype != jnp.int8 or w.dtype != jnp.int8:
        raise KernelError(f"int8_matmul needs int8 operands; got {x_q.dtype} and {w.dtype}.")
    _check_backend()
    if not available():
        return int8_matmul_xla(x_q, w)
    return _int8_batchable(x_q, w)


def int8_linear_ffi(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """The int8 LM head from float activations to float logits in one CPU call: the same values
    as quantize_activations(x), `int8_matmul_ffi` and acc * step * scale (transformer.unembed,
    rounded as XLA's optimised program rounds it).

    Args:
      x: [M, I] float32 activations.
      w: [V, I] int8 weights in [-127, 127]; scale: [V] float32 per-row scales.

    Returns:
      [M, V] float32 logits.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or scale.shape != w.shape[:1]:
        raise KernelError(f"int8_linear needs x [M, I], w [V, I] and scale [V]; got {x.shape}, "
                          f"{w.shape} and {scale.shape}.")
    require_library()
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(INT8_LINEAR_TARGET, out, vmap_method="sequential")
    return call(x.astype(jnp.float32), w.astype(jnp.int8), scale.astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# Attention over the stacked KV cache


def attention_usable(q: jax.Array, cache_k: jax.Array) -> bool:
    """True if attention_ffi handles these operands here (float32 queries; a float32, float16,
    bfloat16 or int8-row cache; CPU; extension loaded)."""
    return (q.dtype == jnp.float32
            and cache_k.dtype in (jnp.float32, jnp.float16, jnp.bfloat16, jnp.int8)
            and jax.default_backend() == "cpu" and available())


def attention_ffi(q: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer, rows: jax.Array,
                  pos: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√H)·v over layer `layer` of the cache, visible positions only, in place.

    Args:
      q: [Bq, T, N, H] float32 queries (RoPE applied).
      cache_k, cache_v: [L, B, K, S, H] float32, float16 or bfloat16, or [L, B, K, S, H + 4]
        int8 rows (codes, then the row's float32 scale: model/cache.py); this call's
        keys/values already written.
      layer: int32 scalar.
      rows: [Bq] int32, the cache row of each query row.
      pos: [Bq] int32; query t of row i sits at position pos[i] + t and sees positions
        0..pos[i] + t of its cache row.

    Returns:
      [Bq, T, N, H] float32.
    """
    require_library()
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    call = jax.ffi.ffi_call(ATTENTION_TARGET, out, vmap_method="sequential")
    return call(q, cache_k, cache_v, jnp.asarray(layer, jnp.int32),
                jnp.asarray(rows, jnp.int32), jnp.asarray(pos, jnp.int32))
