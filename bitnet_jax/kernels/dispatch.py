"""The one place that chooses a kernel: "xla", "ffi" (CPU) or "pallas" (GPU).

`ternary_matmul(x_q [M, I] int8, packed [O/4, I] uint8) -> [M, O] int32` is exact, so every
implementation must agree bit for bit with `ternary_matmul_xla` (parity tests in tests/).
`packed` may also be the stacked [L, O/4, I] weights of all layers with a `layer` index; the CPU
and Pallas kernels read that matrix in place, XLA slices it first. `int8_matmul` is the int8 LM
head ([M, I] x [V, I] int8 -> [M, V] int32), through the CPU kernel or XLA's int8 dot.
`attention_kernel` says whether cached attention runs the CPU kernel (cpu/attention_cpu.h).

The implementation is chosen at trace time by `choose_kernel` from a policy's `kernel`:

  "xla"     in-graph unpack + int8 dot (portable reference)
  "ffi"     packed CPU kernel through jax.ffi (AVX-512/VNNI, AVX2 or portable C++)
  "pallas"  Pallas GPU kernel
  "auto"    ffi on CPU when the extension loads, pallas on GPU (xla, with one warning, where
            the Pallas kernel does not compile: kernels/gpu/fallback.py), xla otherwise

The platform is the one the program is traced for: jax's default device when one is set (a
compile-only GPU included), else the default backend (kernels/gpu/platform.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bitnet_jax.kernels import sharded
from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.kernels.cpu import fused as cpu_fused
from bitnet_jax.kernels.cpu import greedy as cpu_greedy
from bitnet_jax.kernels.cpu import half_head as cpu_half_head
from bitnet_jax.kernels.cpu import kv_quantize as cpu_kv_quantize
from bitnet_jax.kernels.gpu import fallback as gpu_fallback
from bitnet_jax.kernels.gpu.platform import default_platform
from bitnet_jax.kernels.xla import int8_matmul_xla, ternary_matmul_xla

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def choose_kernel(kernel: str = "auto", platform: str | None = None) -> str:
    """Resolve a policy's `kernel` to "xla", "ffi" or "pallas" for `platform`.

    Args:
      kernel: "auto", "xla", "ffi" or "pallas".
      platform: "cpu", "gpu", "cuda", "rocm", ... (default: the traced program's target,
        kernels/gpu/platform.py).
    """
    if kernel != "auto":
        return kernel
    platform = platform or default_platform()
    if platform == "cpu":
        return "ffi" if cpu_ffi.available() else "xla"
    if platform in GPU_PLATFORMS:
        return "pallas" if _pallas_importable() else "xla"
    return "xla"


def _pallas_importable() -> bool:
    try:
        # Deferred: Pallas pulls in jax.experimental's GPU lowering, only needed on a GPU.
        from bitnet_jax.kernels.gpu import pallas  # noqa: F401
    except ImportError:
        return False
    return True


def ternary_matmul(x_q: jax.Array, packed: jax.Array, kernel: str = "auto",
                   layer=None) -> jax.Array:
    """Dispatch [M, I] int8 x packed [O/4, I] -> [M, O] int32 to the chosen implementation.

    With `layer` (int32 scalar), `packed` is [L, O/4, I] and matrix `layer` is used. `packed`
    may also be blocked, [(L,) P, O/(4P), I] (kernels/sharded.py, sharded models).
    """
    return ternary_matmul_many(x_q, [packed], kernel, layer)[0]


def _ternary_one(x_q: jax.Array, packed: jax.Array, kernel: str, layer) -> jax.Array:
    """One standard-layout weight on one device with a resolved kernel."""
    if kernel == "ffi":
        return cpu_ffi.ternary_matmul_ffi(x_q, packed, layer)
    if kernel == "pallas":  # reads matrix `layer` of the stack in place
        # Deferred: see _pallas_importable.
        from bitnet_jax.kernels.gpu import pallas

        return pallas.ternary_matmul_pallas(x_q, packed, layer)
    if layer is not None:
        packed = jax.lax.dynamic_index_in_dim(packed, layer, 0, keepdims=False)
    return ternary_matmul_xla(x_q, packed)


def ternary_matmul_many(x_q: jax.Array, packed: list, kernel: str = "auto",
                        layer=None) -> list:
    """`ternary_matmul` for several weights sharing x_q; the CPU kernel does them in one call.

    On sharded operands the XLA path is partitioned by the compiler and the custom kernels run
    per shard (kernels/sharded.py).
    """
    chosen = choose_kernel(kernel)
    if (kernel == "auto" and chosen == "pallas"
            and not any(sharded.is_blocked(w, layer) for w in packed)
            and not gpu_fallback.pallas_usable(x_q, packed, layer)):
        chosen = "xla"
    kernel = chosen
    if kernel == "xla":
        return [sharded.blocked_matmul_xla(x_q, w, layer) if sharded.is_blocked(w, layer)
                else _ternary_one(x_q, w, kernel, layer) for w in packed]
    return sharded.ternary_many(functools.partial(_custom_many, kernel), x_q, packed, layer)


def _custom_many(kernel: str, x_q: jax.Array, packed: list, layer) -> list:
    if kernel == "ffi":
        return cpu_ffi.ternary_matmul_many_ffi(x_q, packed, layer)
    if kernel == "pallas":  # one pallas_call for all of them (q/k/v, gate/up)
        # Deferred: see _pallas_importable.
        from bitnet_jax.kernels.gpu import pallas

        return pallas.ternary_matmul_many_pallas(x_q, packed, layer)
    return [_ternary_one(x_q, w, kernel, layer) for w in packed]


def linear_fusable(kernel: str, x: jax.Array, packed: list, layer) -> bool:
    """Whether BitLinear's quantise -> packed matmul -> scale can be ONE CPU kernel call
    (`ternary_linear_many`): the "ffi" kernel with its library loaded, standard-layout weights
    on one device (sharded models keep the per-shard int32 kernel, kernels/sharded.py)."""
    return (choose_kernel(kernel) == "ffi" and cpu_ffi.available()
            and not any(sharded.is_blocked(w, layer) for w in packed)
            and sharded.mesh_of(x, *packed) is None)


def ternary_linear_many(x: jax.Array, packed: list, scales: list, layer=None, *, norm=None,
                        eps: float = 1e-6, residual=None, act: str | None = None) -> list:
    """[M, I] float activations through several packed weights in one CPU kernel call that
    also quantises x and scales the products: list of [M, O_j] float32, the same int32 products
    as quantize_activations + `ternary_matmul_many`, scaled as bitlinear_many does to a few ulp
    (cpu/ffi.py). With `norm` (gain [I]), `residual` ([M, O], one weight) or `act` ("silu" /
    "relu2", gate and up) the call also runs the RMSNorm before and the residual add or the
    gated activation after (cpu/fused.py; to float rounding). Only where `linear_fusable`
    holds."""
    if norm is None and residual is None and act is None:
        return cpu_ffi.ternary_linear_many_ffi(x, packed, scales, layer)
    return cpu_fused.fused_linear_ffi(x, packed, scales, layer, norm=norm, eps=eps,
                                      residual=residual, act=act)


def int8_matmul(x_q: jax.Array, w: jax.Array, kernel: str = "auto") -> jax.Array:
    """[M, I] int8 x [V, I] int8 -> [M, V] int32: the CPU kernel for "ffi" (and "auto" on CPU),
    XLA's int8 dot otherwise."""
    if choose_kernel(kernel) == "ffi":
        return sharded.int8_head(cpu_ffi.int8_matmul_ffi, x_q, w)
    return int8_matmul_xla(x_q, w)


def int8_linear_usable(kernel: str, x: jax.Array, w: jax.Array) -> bool:
    """Whether the int8 LM head runs as ONE CPU call from float activations to float logits
    (`int8_linear`): "ffi" (or "auto" on a CPU) with the extension loaded, on one device."""
    return (choose_kernel(kernel) == "ffi" and cpu_ffi.available()
            and sharded.mesh_of(x, w) is None)


def int8_linear(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x [M, I] float -> [M, V] float32 logits through the int8 head w [V, I] with row scales
    [V]: quantisation, int8 product and dequantisation in one CPU call (cpu/ffi.py)."""
    return cpu_ffi.int8_linear_ffi(x, w, scale)


def half_linear_usable(kernel: str, x: jax.Array, w: jax.Array) -> bool:
    """Whether a float LM head kept in float16 / bfloat16 runs as ONE CPU call (`half_linear`):
    "ffi" (or "auto" on a CPU), float32 x, the extension loaded, one device."""
    return (choose_kernel(kernel) == "ffi" and cpu_half_head.half_linear_usable(x, w)
            and sharded.mesh_of(x, w) is None)


def half_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, D] float32 by the 16-bit table w [V, D] -> [M, V] float32 logits, each weight
    widened exactly (cpu/half_head.py)."""
    return cpu_half_head.half_linear_ffi(x, w)


def attention_kernel(kernel: str, q: jax.Array, cache_k: jax.Array) -> str:
    """Which cached attention runs: "ffi" (the CPU kernel, cpu/attention_cpu.h), "pallas" (the
    GPU kernel, gpu/attention.py: `cached_attention_pallas`) or "xla" (model/attention.py)."""
    chosen = choose_kernel(kernel)
    if chosen == "pallas" and cache_k.dtype == jnp.int8:
        return "xla"  # the GPU kernels read float caches only (model/cache.py int8 rows)
    if chosen == "pallas":
        # Deferred: see _pallas_importable.
        from bitnet_jax.kernels.gpu import attention as gpu_attention

        usable = (gpu_attention.usable(q.shape, cache_k.shape)
                  and sharded.attention_shardable(q, cache_k))
        if usable and kernel == "auto":
            usable = gpu_fallback.attention_usable(q, cache_k)
        return "pallas" if usable else "xla"
    if chosen != "ffi":
        return "xla"
    usable = cpu_ffi.attention_usable(q, cache_k) and sharded.attention_shardable(q, cache_k)
    return "ffi" if usable else "xla"


def greedy_usable(kernel: str, logits: jax.Array) -> bool:
    """Whether the greedy choice runs the CPU kernel (`greedy_tokens`): "ffi" (or "auto" on a
    CPU) with the extension loaded, logits on one device."""
    return (choose_kernel(kernel) == "ffi" and cpu_ffi.available()
            and sharded.mesh_of(logits) is None)


def greedy_tokens(logits: jax.Array, seen: jax.Array, penalty: jax.Array):
    """(argmax of the repetition-penalised logits [B] int32, all logits finite [B] bool) in one
    CPU call (cpu/greedy.py): logits [B, V] float32, seen [B, V] bool, penalty [B]."""
    return cpu_greedy.greedy_ffi(logits, seen, penalty)


def quantize_kv_usable(kernel: str, k: jax.Array) -> bool:
    """Whether an int8 KV cache's new rows come from the CPU kernel (`quantize_kv`): "ffi" (or
    "auto" on a CPU) with the extension loaded, k on one device."""
    return (choose_kernel(kernel) == "ffi" and cpu_ffi.available()
            and sharded.mesh_of(k) is None)


def quantize_kv(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k, v [..., H] -> int8 rows [..., H + 4] in one CPU call (cpu/kv_quantize.py), the bytes
    of model/cache.quantize_rows."""
    return cpu_kv_quantize.quantize_kv_ffi(k, v)


def fused_decode(kernel: str, dtype, batch: int, weights: list, cache_k: jax.Array,
                 heads: int) -> bool:
    """True when a decode step's layers run as the fused Pallas launches (model/fused.py):
    the kernel resolves to "pallas" (a GPU target), one device, `batch` <= 16 rows and shapes
    gpu/fused.py and gpu/decode_attention.py take, and under "auto" they compile there.

    Args:
      kernel: the policy's kernel; dtype: the compute dtype; batch: B.
      weights: stacked packed [L, O/4, I] q, k, v, o, gate, up, down.
      cache_k: [L, B', K, S, H]; heads: N.
    """
    if (choose_kernel(kernel) != "pallas" or cache_k.dtype == jnp.int8
            or sharded.mesh_of(cache_k, *weights) is not None):
        return False
    # Deferred: see _pallas_importable.
    from bitnet_jax.kernels.gpu import decode_attention, fused
    if not (decode_attention.usable(heads, cache_k.shape) and batch <= cache_k.shape[1]
            and all(fused.usable(batch, w.shape[-1], [w.shape[1]]) for w in weights)):
        return False
    return kernel != "auto" or gpu_fallback.fused_usable(dtype, batch, weights, cache_k, heads)


def fused_bitlinear(x, packed, scales, layer, **kw) -> jax.Array:
    """RMSNorm -> int8 quantisation -> packed ternary matmul -> epilogue in one Pallas GPU call
    (gpu/fused.py): x [M, I], stacked packed [L, O_j/4, I], scales [L] -> [M, ΣO_j]."""
    # Deferred: see _pallas_importable.
    from bitnet_jax.kernels.gpu import fused
    return fused.fused_bitlinear(x, packed, scales, layer, **kw)


def decode_attention(qkv, cos, sin, cache_k, cache_v, layer, pos, *, heads: int):
    """RoPE, the KV-cache write and attention of one decode step in one Pallas GPU call
    (gpu/decode_attention.py): qkv [B, (N + 2K)·H] -> (out [B, N·H], cache_k, cache_v)."""
    # Deferred: see _pallas_importable.
    from bitnet_jax.kernels.gpu import decode_attention as gpu_decode
    return gpu_decode.decode_attention(qkv, cos, sin, cache_k, cache_v, layer, pos, heads=heads)


def cached_attention_ffi(q, cache_k, cache_v, layer, rows, pos) -> jax.Array:
    """The CPU attention kernel over one layer of the stacked cache, in place (cpu/ffi.py).

    q [Bq, T, N, H]; caches [L, B, K, S, H]; layer int32 []; rows, pos int32 [Bq]: query t of
    row i sits at position pos[i] + t of cache row rows[i] and sees its positions 0..pos[i] + t.
    """
    return sharded.attention(cpu_ffi.attention_ffi, q, cache_k, cache_v, layer, rows, pos)


def cached_attention_pallas(q, cache_k, cache_v, layer, rows, pos) -> jax.Array:
    """The Pallas GPU attention kernel over one layer of the stacked cache, in place
    (gpu/attention.py); same arguments as `cached_attention_ffi`, q in the compute dtype."""
    # Deferred: see _pallas_importable.
    from bitnet_jax.kernels.gpu import attention as gpu_attention

    return sharded.attention(gpu_attention.cached_attention_pallas, q, cache_k, cache_v, layer,
                             rows, pos)
