"""The jitted half of generation: decode state, prefill, the chunked decode loop, shape buckets.

Decode state (a dict pytree, donated on every call so the KV cache is updated in place,
jax-notes §5):

  cache     {"k", "v"}: [L, B, K, S, H] in policy.kv_cache (model/cache.py layout)
  index     int32 []     shared write cursor: the next free cache slot
  starts    int32 [B]    first valid slot of each row (rows are left-padded, right-aligned)
  token     int32 [B]    last sampled token: the next decode step's input
  count     int32 [B]    tokens generated so far (also the step folded into the row's seed)
  done      bool  [B]    row finished (EOS, max_new) or padding
  seen      bool  [B, V] tokens in the prompt or output (repetition penalty)
  finite    bool  [B]    every logit the row was sampled from was finite

Per-request values (sampling knobs, max_new, EOS ids) are arrays too, so a new request with
other settings reuses the compiled programs (jax-notes §1.2, recommended design 4, 8).

Shapes are bucketed so the number of programs stays small: batch to 1, 2, 4, ..., 64; prompt
chunks to powers of two from 16 up to a per-batch maximum (longer prompts are prefilled in
several chunks); the cache length S to the next power of two of padded prompt + max_new,
capped at max_position_embeddings. The last prefill chunk is right-padded: its pad slots lie
after the prompt, so the cursor moves back to the prompt's end and decoding overwrites them.

Programs are compiled ahead of time (`jit(...).lower(...).compile()`) and kept per shape
signature, which gives exact compile times, `warmup`, and `TRACES` (Python traces per program,
read by the tests to catch recompiles).
"""

from __future__ import annotations

import collections
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model import transformer as model_lib
from bitnet_jax.runtime import sampling
from bitnet_jax.model.cache import init_cache
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.runtime.compile_cache import enable_compilation_cache
from bitnet_jax.model.policy import Policy

PREFILL_FLOOR = 16
MAX_PREFILL_CHUNK = 512
PREFILL_TOKENS_PER_CALL = 2048  # bounds the [B, N, T, S] attention scores of one prefill call
DECODE_CHUNK = 16
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PAD_ID = 0
MANY_PROGRAMS = 32  # warn once when one entry point has compiled this many shapes

TRACES: collections.Counter = collections.Counter()
_COMPILED: dict[tuple, object] = {}


# ------------------------------------------------------------------------------------------------
# Buckets


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def batch_bucket(n: int) -> int:
    """Smallest batch bucket holding n rows (n <= 64)."""
    return next(b for b in BATCH_BUCKETS if b >= n)


def max_prefill_chunk(batch: int) -> int:
    """Longest prefill chunk T for a batch bucket: B·T stays near PREFILL_TOKENS_PER_CALL."""
    return max(PREFILL_FLOOR, min(MAX_PREFILL_CHUNK, PREFILL_TOKENS_PER_CALL // batch))


def prefill_chunks(end: int, batch: int, cache_len: int) -> list[tuple[int, int]]:
    """(start slot, chunk length T) of each prefill call for prompts ending at slot `end`."""
    tmax = max_prefill_chunk(batch)
    chunks, start = [], 0
    while start < end:
        t = min(tmax, max(PREFILL_FLOOR, next_pow2(end - start)))
        if start + t > cache_len:  # only when max_position_embeddings is not a bucket multiple
            t = cache_len - start
        chunks.append((start, t))
        start += t
    return chunks


def cache_length(end: int, batch: int, max_new: int, max_positions: int) -> int:
    """KV cache length S: next power of two of (padded prompt + max_new), capped at the context."""
    unbounded = end + max_prefill_chunk(batch)  # the padded prompt, before any cap
    padded = sum(t for _, t in prefill_chunks(end, batch, cache_len=unbounded))
    return min(next_pow2(padded + max_new), max_positions)


# ------------------------------------------------------------------------------------------------
# State


def init_state(cfg: ModelConfig, starts: jax.Array, done: jax.Array, length: int,
               dtype) -> dict:
    """Fresh decode state (module docstring) for B = len(starts) rows and a cache of S = length."""
    b = starts.shape[0]
    return {
        "cache": init_cache(cfg, b, length, dtype),
        "index": jnp.zeros((), jnp.int32),
        "starts": starts.astype(jnp.int32),
        "token": jnp.zeros((b,), jnp.int32),
        "count": jnp.zeros((b,), jnp.int32),
        "done": done.astype(bool),
        "seen": jnp.zeros((b, cfg.vocab_size), bool),
        "finite": jnp.ones((b,), bool),
    }


@functools.lru_cache(maxsize=None)
def _state_initializer(device: jax.Device):
    # Allocate the (possibly large) cache directly on the device, never on the host first.
    return jax.jit(init_state, static_argnames=("cfg", "length", "dtype"),
                   out_shardings=jax.sharding.SingleDeviceSharding(device))


def new_state(cfg: ModelConfig, starts: np.ndarray, done: np.ndarray, length: int, dtype,
              device: jax.Device) -> dict:
    """init_state, allocated on `device`."""
    starts = jax.device_put(np.asarray(starts, np.int32), device)
    done = jax.device_put(np.asarray(done, bool), device)
    return _state_initializer(device)(cfg, starts, done, length=length, dtype=jnp.dtype(dtype))


# ------------------------------------------------------------------------------------------------
# The jitted programs


def prefill(params: dict, state: dict, tokens: jax.Array, end: jax.Array, knobs: dict,
            eos: jax.Array, *, cfg: ModelConfig, policy: Policy) -> dict:
    """Run one prompt chunk into the cache; on the last chunk, sample each row's first token.

    Args:
      params: model params on the device.
      state: decode state; this chunk goes to slots index..index+T-1.
      tokens: [B, T] int32 prompt chunk (left padding before starts, right padding at >= end).
      end: int32 [] slot just after the prompts' last token (the same for every row).
      knobs: sampling knobs {name: [B]} plus "max_new" [B] int32.
      eos: [E] int32 stop token ids (-1 entries never match).
      cfg, policy: static.

    Returns:
      The new state: cursor at min(index + T, end); after the last chunk every live row holds
      its first sampled token (count 1).
    """
    TRACES["prefill"] += 1
    b, t = tokens.shape
    index = state["index"]
    h, cache = model_lib.apply(params, tokens, cfg, policy, cache=state["cache"], index=index,
                               starts=state["starts"])
    slots = index + jnp.arange(t, dtype=jnp.int32)
    real = (slots[None, :] >= state["starts"][:, None]) & (slots[None, :] < end)  # [B, T]
    rows = jnp.arange(b)[:, None]
    seen = state["seen"].at[rows, jnp.where(real, tokens, cfg.vocab_size)].set(True, mode="drop")
    last = end <= index + t
    # Rows are right-aligned, so every row's last prompt token sits in the same column.
    h_last = jax.lax.dynamic_index_in_dim(h, jnp.clip(end - 1 - index, 0, t - 1), axis=1,
                                          keepdims=False)  # [B, D]
    logits = model_lib.unembed(params, h_last, cfg, policy).astype(jnp.float32)  # [B, V]
    state = dict(state, cache=cache, seen=seen, index=jnp.where(last, end, index + t))
    return _advance(state, logits, knobs, eos, ~state["done"] & last)


def decode_chunk(params: dict, state: dict, knobs: dict, eos: jax.Array, n_steps: jax.Array,
                 stop: jax.Array, *, cfg: ModelConfig, policy: Policy, chunk: int):
    """Run up to `n_steps` (<= chunk) decode steps in one lax.while_loop, then return to host.

    The loop also ends early when every row is done or the cache is full (index == S).

    Args:
      params, state, knobs, eos, cfg, policy: as in `prefill`.
      n_steps: int32 [] steps wanted this call (traced: any value reuses the program).
      stop: [B] bool rows the host finished (stop strings); they are marked done first.
      chunk: static size of the output buffer.

    Returns:
      (state, out): out [B, chunk] int32 holds the token each row produced at each step, or -1.
    """
    TRACES["decode"] += 1
    b = state["token"].shape[0]
    s = state["cache"]["k"].shape[3]
    state = dict(state, done=state["done"] | stop)

    def cond(carry):
        i, st, _ = carry
        return (i < n_steps) & ~jnp.all(st["done"]) & (st["index"] < s)

    def body(carry):
        i, st, out = carry
        h, cache = model_lib.apply(params, st["token"][:, None], cfg, policy, cache=st["cache"],
                                   index=st["index"], starts=st["starts"])
        logits = model_lib.unembed(params, h[:, 0], cfg, policy).astype(jnp.float32)
        active = ~st["done"]
        st = _advance(dict(st, cache=cache, index=st["index"] + 1), logits, knobs, eos, active)
        column = jnp.where(active, st["token"], -1)[:, None]
        return i + 1, st, jax.lax.dynamic_update_slice(out, column, (0, i))

    out = jnp.full((b, chunk), -1, jnp.int32)
    _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return state, out


def _advance(state: dict, logits: jax.Array, knobs: dict, eos: jax.Array,
             active: jax.Array) -> dict:
    """Sample a token for each active row and update token/count/done/seen/finite."""
    tok = sampling.sample(logits, state["seen"], knobs, state["count"])
    count = state["count"] + active.astype(jnp.int32)
    is_eos = jnp.any(tok[:, None] == eos[None, :], axis=1)
    done = state["done"] | (active & (is_eos | (count >= knobs["max_new"])))
    rows = jnp.arange(tok.shape[0])
    vocab = state["seen"].shape[1]
    seen = state["seen"].at[rows, jnp.where(active, tok, vocab)].set(True, mode="drop")
    finite = state["finite"] & (jnp.all(jnp.isfinite(logits), axis=-1) | ~active)
    return dict(state, token=jnp.where(active, tok, state["token"]), count=count, done=done,
                seen=seen, finite=finite)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation, one program per shape signature


def compiled(fn, args: tuple, static: dict, device: jax.Device) -> tuple[object, float]:
    """The compiled program of `fn` for these argument shapes, and the seconds spent compiling.

    Args:
      fn: `prefill` or `decode_chunk`.
      args: positional arguments (arrays or jax.ShapeDtypeStruct), the state second.
      static: keyword-only static arguments.
      device: where the arguments live (part of the key).
    """
    key = (fn.__name__, tuple(sorted(static.items())), device, _signature(args))
    exe = _COMPILED.get(key)
    if exe is not None:
        return exe, 0.0
    enable_compilation_cache()
    t0 = time.perf_counter()
    jitted = jax.jit(fn, static_argnames=tuple(static), donate_argnames=("state",))
    exe = jitted.lower(*args, **static).compile()
    _COMPILED[key] = exe
    count = sum(k[0] == fn.__name__ for k in _COMPILED)
    if count == MANY_PROGRAMS:  # jax-notes §6.1: say so when shapes keep changing
        warnings.warn(f"bitnet_jax has compiled {count} `{fn.__name__}` programs in this process; "
                      "requests with many different batch sizes, prompt buckets or models each "
                      "need their own (see bitnet_jax.warmup).", stacklevel=3)
    return exe, time.perf_counter() - t0


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return (str(treedef),) + tuple(
        (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)


def abstract(tree, device: jax.Device):
    """ShapeDtypeStructs on `device` mirroring `tree` (to compile without real inputs)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
