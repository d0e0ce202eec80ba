"""Device memory: do params + KV cache + a program's temporaries fit? Clear errors when not.

`check_fit`: the params (unless already on the device), the KV cache of `slots` rows of
`context` positions, and the largest compiled program's temporaries (`temp_bytes`, from
`Compiled.memory_analysis()`) must fit in the free memory. runtime/placement.py checks the
params (slots=0) before placing them; the engine's decode state is to be checked the same way
before it is allocated. Otherwise it raises a one-line DeviceError saying how many slots (at this context) or
how much context (with these slots) would fit. An out-of-memory that still happens while
compiling or running (XLA's RESOURCE_EXHAUSTED) becomes the same kind of error through
`as_memory_error` / `memory_errors`.

Free memory, first that applies:
  1. `memory_limit` passed by the caller (bytes);
  2. the environment variable BITNET_JAX_MEMORY_LIMIT ("24GB", "8GiB", "512MB", or bytes):
     a budget for sharing a GPU with other processes, and how CPU tests exercise the check;
  3. `device.memory_stats()` (GPUs): bytes_limit - bytes_in_use. JAX's allocator reserves 75%
     of the GPU at start (XLA_PYTHON_CLIENT_PREALLOCATE=false turns that off,
     XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 changes the share), and bytes_limit is that pool;
  4. unknown (a CPU without a limit): no check.

Sizes (model/cache.py, model/params.py): KV cache 2·L·B·K·S·H·itemsize(policy.kv_cache)
(H + 4 for int8); packed weights L·O·I/4 bytes per BitLinear plus f32 scales; float leaves in
the param dtype; an int8 LM head V·D bytes + 4·V.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import jax
import jax.numpy as jnp

from bitnet_jax.errors import DeviceError
from bitnet_jax.model.cache import row_width
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.params import BITLINEAR_PATHS, param_shapes, placed_dtype
from bitnet_jax.model.policy import Policy

ENV = "BITNET_JAX_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_OOM = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM when allocating")


def parse_bytes(text: str) -> int:
    """"24GB", "8 GiB", "512MB", "1.5e9" or "1000000" -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise DeviceError(f"{ENV}={text!r} is not a size; write bytes or a number with a unit "
                          "(e.g. 24GB, 8GiB, 512MB).")
    return int(float(m.group(1)) * _UNITS[unit])


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def param_specs(cfg: ModelConfig, policy: Policy, *, lm_head: str = "float") -> dict:
    """Abstract params (ShapeDtypeStructs) of a packed model, as the engine places them.

    Args:
      cfg: model config (a BitNet model: cfg.quantized).
      policy: float leaves take policy.param_dtype.
      lm_head: "float", or "int8" for the int8 row-scaled head of params.quantize_lm_head.
    """
    shapes = param_shapes(cfg)
    dtype = jnp.dtype(policy.param_dtype)

    def leaf(shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    specs = jax.tree.map(leaf, shapes, is_leaf=lambda s: isinstance(s, tuple))
    if cfg.quantized:
        for mod, name in BITLINEAR_PATHS:
            n, o, i = shapes["layers"][mod][name]
            specs["layers"][mod][name] = {"packed": jax.ShapeDtypeStruct((n, o // 4, i), jnp.uint8),
                                          "scale": jax.ShapeDtypeStruct((n,), jnp.float32)}
    if lm_head == "int8":
        key = "embed_tokens" if cfg.tie_word_embeddings else "lm_head"
        v, d = shapes[key]
        specs[key] = {"q8": jax.ShapeDtypeStruct((v, d), jnp.int8),
                      "scale": jax.ShapeDtypeStruct((v,), jnp.float32)}
    return specs


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def placed_bytes(params, policy: Policy) -> int:
    """Bytes `params` take once placed for `policy`: float leaves in its param dtype (quantisation
    scales stay float32; a packed model's 16-bit tables may stay 16-bit: params.table_dtype),
    everything else as it is (runtime/placement.py casts the same way)."""
    return sum(math.prod(x.shape) * placed_dtype(path, x.dtype, params, policy.param).itemsize
               for path, x in jax.tree_util.tree_flatten_with_path(params)[0])


def kv_cache_bytes(cfg: ModelConfig, policy: Policy, slots: int, context: int) -> int:
    """Bytes of the KV cache {"k", "v"} [L, B, K, S, H] (int8: H + 4) with B = slots, S =
    context."""
    dtype = jnp.dtype(policy.kv_cache)
    per = cfg.num_hidden_layers * cfg.num_key_value_heads * row_width(cfg.head_dim, dtype)
    return 2 * per * slots * context * dtype.itemsize


def free_memory(device, memory_limit: int | None = None) -> tuple[int | None, str]:
    """(free bytes or None when unknown, where the number came from) (module docstring)."""
    if memory_limit is not None:
        return int(memory_limit), "memory_limit"
    if os.environ.get(ENV, "").strip():
        return parse_bytes(os.environ[ENV]), ENV
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), "memory_stats"
    return None, "unknown"


def check_fit(cfg: ModelConfig, policy: Policy, *, params_bytes: int, slots: int, context: int,
              device, temp_bytes: int = 0, params_on_device: bool = False,
              memory_limit: int | None = None) -> dict:
    """Refuse a configuration whose memory does not fit on `device`.

    Args:
      cfg, policy: the model config and precision policy (the KV cache dtype).
      params_bytes: bytes of the params (`tree_bytes` of them or of `param_specs`).
      slots, context: decode slots B and cache length S.
      device: the jax Device.
      temp_bytes: the largest program's temporaries (memory_analysis().temp_size_in_bytes).
      params_on_device: the params are already placed (then counted in memory_stats'
        bytes_in_use, not again; a memory budget still counts them).
      memory_limit: bytes available, overriding the environment and the device.

    Returns:
      {"need", "free", "source", "params", "kv_cache", "temp"} in bytes (free None if unknown).

    Raises:
      DeviceError: one line with what would fit.
    """
    free, source = free_memory(device, memory_limit)
    # Placed params are already in memory_stats' bytes_in_use; a budget (memory_limit, the
    # environment variable) covers them too.
    params = 0 if params_on_device and source == "memory_stats" else int(params_bytes)
    kv = kv_cache_bytes(cfg, policy, slots, context)
    need = params + kv + int(temp_bytes)
    report = {"need": need, "free": free, "source": source, "params": params, "kv_cache": kv,
              "temp": int(temp_bytes)}
    if free is None or need <= free:
        return report
    room = free - params - int(temp_bytes)  # what the cache may use
    fit_slots = fit_context = 0
    if room > 0 and slots and context:
        fit_slots = room // kv_cache_bytes(cfg, policy, 1, context)
        fit_context = room // kv_cache_bytes(cfg, policy, slots, 1)
        fit_context -= fit_context % 16  # prefill chunks are multiples of 16
    hint = (f"use at most {fit_slots} slots at context {context}, or context {fit_context} "
            f"with {slots} slots" if fit_slots or fit_context else
            "the params and programs alone do not fit: use a smaller model or another device")
    parts = [f"params {gb(params)}"]
    if kv:
        parts.append(f"KV cache {gb(kv)} for {slots} slots x {context} positions")
    if temp_bytes:
        parts.append(f"temporaries {gb(int(temp_bytes))}")
    raise DeviceError(
        f"The model needs {gb(need)} on {device} ({' + '.join(parts)}) but {gb(free)} are free "
        f"({source}); {hint} (or raise {ENV} / XLA_PYTHON_CLIENT_MEM_FRACTION).")


def is_out_of_memory(error: BaseException) -> bool:
    """True for XLA's out-of-memory errors (RESOURCE_EXHAUSTED) raised at compile or run time."""
    return any(marker in str(error) for marker in _OOM)


def as_memory_error(error: BaseException, cfg: ModelConfig, policy: Policy, *, slots: int,
                    context: int, device, params_bytes: int = 0, temp_bytes: int = 0
                    ) -> DeviceError | None:
    """The clear DeviceError for an out-of-memory `error` (None if it is not one).

    With the device's free memory known the message is `check_fit`'s (how many slots / how much
    context would fit); otherwise it names the sizes and the knobs.
    """
    if not is_out_of_memory(error):
        return None
    try:
        check_fit(cfg, policy, params_bytes=params_bytes, slots=slots, context=context,
                  device=device, temp_bytes=temp_bytes, params_on_device=True)
    except DeviceError as fit:
        return fit
    kv = kv_cache_bytes(cfg, policy, slots, context)
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    return DeviceError(
        f"Out of memory on {device} ({first}) with a KV cache of {gb(kv)} for {slots} slots x "
        f"{context} positions; use fewer slots or a shorter context (or set {ENV} to the memory "
        "bitnet_jax may use, or XLA_PYTHON_CLIENT_MEM_FRACTION to give JAX more of the GPU).")


@contextlib.contextmanager
def memory_errors(cfg: ModelConfig, policy: Policy, **fit):
    """Turn an out-of-memory inside the block into `as_memory_error`'s DeviceError.

    `fit` holds as_memory_error's keyword arguments (slots, context, device, ...).
    """
    try:
        yield
    except DeviceError:
        raise
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are translated
        clear = as_memory_error(e, cfg, policy, **fit)
        if clear is None:
            raise
        raise clear from e
