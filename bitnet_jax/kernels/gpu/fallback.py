"""kernel="auto" on a GPU: use the Pallas kernel only where it compiles, else XLA, warning once.

A Pallas kernel can fail on a GPU where the XLA path works: a jax without the Triton backend
(deprecated in jax 0.11), a lowering rule missing in a newer jax, a block config over the GPU's
shared memory ("Shared memory size limit exceeded"), an unknown GPU model. Inside a traced
program such a failure would surface when the whole program is lowered or compiled, as a
traceback. So before `kernels.dispatch` sends a matmul to Pallas under kernel="auto", it asks
`pallas_usable`, which compiles that one call on its own for the target device (abstract
operands: nothing runs) and remembers the answer per shape and device kind. On failure the
dispatcher uses the XLA path and the first failure is reported with one warning.
The fused decode kernels (gpu/fused.py, gpu/decode_attention.py) are probed the same way
(`fused_usable`); when they fail, a decode step runs the composed layers (still Pallas matmuls
where those compile), with one warning of its own.
kernel="pallas" skips the check, so a failure shows its real error.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from bitnet_jax.kernels.gpu.platform import default_device

_USABLE: dict[tuple, bool] = {}
_WARNED: dict[str, str] = {}  # what ran instead -> the first failure
_XLA = "the XLA path instead, which is slower"
_COMPOSED = ("the decode layers one kernel per operation instead of fused (about 5x the "
             "launches per step)")


def pallas_usable(x_q: jax.Array, packed: list, layer) -> bool:
    """True if the Pallas ternary matmul compiles for these operands on the target device.

    Args:
      x_q: [M, I] int8 activations (or their abstract value).
      packed: the packed weights, [O_j/4, I] or stacked [L, O_j/4, I] with `layer`.
      layer: None or the int32 layer index (only its presence matters).
    """
    stacked = layer is not None

    def call(x, ws, layer):
        return _pallas().ternary_matmul_many_pallas(x, ws, layer if stacked else None,
                                                    interpret=False)

    def args(spec):
        return (spec(x_q.shape, jnp.int8), [spec(w.shape, jnp.uint8) for w in packed],
                spec((), jnp.int32))

    key = ("matmul", tuple(x_q.shape), tuple(tuple(w.shape) for w in packed), stacked)
    return _usable(key, call, args)


def attention_usable(q: jax.Array, cache_k: jax.Array) -> bool:
    """True if the Pallas cached-attention kernel compiles for these shapes on the target."""

    def call(q, ck, cv, layer, rows, pos):
        # Deferred: attention.py imports jax.experimental.pallas (see _pallas).
        from bitnet_jax.kernels.gpu import attention

        return attention.cached_attention_pallas(q, ck, cv, layer, rows, pos, interpret=False)

    def args(spec):
        bq = q.shape[0]
        return (spec(q.shape, q.dtype), spec(cache_k.shape, cache_k.dtype),
                spec(cache_k.shape, cache_k.dtype), spec((), jnp.int32),
                spec((bq,), jnp.int32), spec((bq,), jnp.int32))

    key = ("attention", tuple(q.shape), str(q.dtype), tuple(cache_k.shape), str(cache_k.dtype))
    return _usable(key, call, args)


def fused_usable(dtype, batch: int, weights: list, cache_k: jax.Array, heads: int) -> bool:
    """True if the fused decode kernels (gpu/fused.py, gpu/decode_attention.py) compile for one
    decode step of `batch` rows: weights = stacked packed q, k, v, o, gate, up, down."""
    # Deferred: these modules import jax.experimental.pallas (see _pallas).
    from bitnet_jax.kernels.gpu import decode_attention, fused

    def call(x, ws, scales, g_in, g_ff, ck, cv, table, pos):
        lin = functools.partial(fused.fused_bitlinear, eps=1e-6, interpret=False)
        qkv = lin(x, ws[:3], scales[:3], 0, norm=g_in)
        a, ck, cv = decode_attention.decode_attention(qkv, table, table, ck, cv, 0, pos,
                                                      heads=heads, interpret=False)
        x = lin(a, ws[3:4], scales[3:4], 0, residual=x)
        h = lin(x, ws[4:6], scales[4:6], 0, norm=g_in, act=jax.nn.relu)
        return lin(h, ws[6:], scales[6:], 0, norm=g_ff, residual=x), ck, cv

    def args(spec):
        nl, i_ff = weights[0].shape[0], weights[6].shape[-1]
        return (spec((batch, weights[0].shape[-1]), dtype),
                [spec(w.shape, jnp.uint8) for w in weights],
                [spec((nl,), jnp.float32) for _ in weights],
                spec((nl, weights[0].shape[-1]), dtype), spec((nl, i_ff), dtype),
                spec(cache_k.shape, cache_k.dtype), spec(cache_k.shape, cache_k.dtype),
                spec((batch, cache_k.shape[-1]), jnp.float32), spec((batch,), jnp.int32))

    key = ("fused", str(jnp.dtype(dtype)), batch, tuple(tuple(w.shape) for w in weights),
           tuple(cache_k.shape), str(cache_k.dtype), heads)
    return _usable(key, call, args, instead=_COMPOSED)


def _pallas():
    # Deferred: pallas.py imports jax.experimental.pallas, needed only once a GPU is the target.
    from bitnet_jax.kernels.gpu import pallas

    return pallas


def _usable(key: tuple, call, args, instead: str = _XLA) -> bool:
    device = default_device()
    key = key + (device.platform, device.device_kind)
    if key not in _USABLE:
        try:
            _compile_probe(call, args, device)
            _USABLE[key] = True
        except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
            _USABLE[key] = False
            _warn_once(e, instead)
    return _USABLE[key]


def _compile_probe(call, args, device) -> None:
    """Lower and compile `call` alone for `device` (raises on failure); args(spec) builds its
    abstract arguments from spec(shape, dtype)."""
    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

    with jax.default_device(device):
        jax.jit(call).trace(*args(spec)).lower().compile()


def _warn_once(error: Exception, instead: str) -> None:
    """One warning per fallback kind (the XLA path, the composed decode layers)."""
    if instead in _WARNED:
        return
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    _WARNED[instead] = first
    warnings.warn(
        f"bitnet_jax: the Pallas GPU kernel does not compile here ({type(error).__name__}: "
        f"{first}); kernel='auto' runs {instead}. Use kernel='xla' to choose the XLA path "
        "explicitly, or kernel='pallas' to see the full error.",
        RuntimeWarning, stacklevel=4)


def reset() -> None:
    """Forget every probe result and the warning (tests)."""
    _USABLE.clear()
    _WARNED.clear()
