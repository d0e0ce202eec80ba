"""The jitted half of the serving engine: slot state, prefill-into-a-slot, the chunked decode loop.

The engine keeps B decode slots (B a bucket: 1, 2, 4, ..., 64) whose whole state lives on the
device. Its programs follow JetStream's prefill / insert / generate contract and MaxText's
insert with a traced slot index, with the prefill written straight into the slot's cache row
(model/cache.py), so one program serves every slot and no second cache is copied in:

  prefill(params, state, tokens [1, T], slot, start, n_valid, last, knobs, eos)
      one chunk of one request's prompt into slot `slot` at positions start..start+T-1 (the
      first chunk, start == 0, resets the slot); the last chunk samples the first token.
  decode(params, state, n_steps, stop)
      up to n_steps (<= chunk) decode steps of every live slot in one lax.while_loop, then
      back to the host with the tokens each slot produced.

Decode state (a dict pytree, donated on every call so the KV cache is updated in place,
jax-notes §5):

  cache     {"k", "v"}: [L, B, K, S, H] in policy.kv_cache (model/cache.py layout)
  length    int32 [B]    tokens in the slot's cache row: the next token's position
  token     int32 [B]    last sampled token: the next decode step's input
  count     int32 [B]    tokens generated so far (also the step folded into the slot's seed)
  done      bool  [B]    slot idle, finished (EOS, max_new, cache full) or still prefilling
  seen      bool  [B, V] tokens in the prompt or output (repetition penalty)
  finite    bool  [B]    every logit the slot was sampled from was finite
  knobs     {name: [B]}  sampling knobs (runtime/sampling.py) plus "max_new" int32
  eos       int32 [B, E] stop token ids per slot (-1 never matches)

Slot indices, positions, knobs and step counts are traced values, so requests join and leave
with no recompilation: the programs depend only on (B, S, T, the model, the policy) and are
compiled ahead of time (`jit(...).lower(...).compile()`), one per shape signature (`compiled`).
`TRACES` counts Python traces per program (the tests read it to catch recompiles).

Logprobs are of the model's raw distribution, log_softmax of the logits before the repetition
penalty, temperature and filtering (vLLM's default); the top TOP_LOGPROBS come only from the
`logprobs=True` decode program.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model import transformer as model_lib
from bitnet_jax.model.cache import init_cache
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.policy import Policy
from bitnet_jax.runtime import sampling
from bitnet_jax.runtime.compile_cache import enable_compilation_cache

PREFILL_FLOOR = 16
MAX_PREFILL_CHUNK = 256
DECODE_CHUNK = 16
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOP_LOGPROBS = 20  # OpenAI's upper bound for top_logprobs
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


def prefill_plan(n: int, cache_len: int) -> list[tuple[int, int]]:
    """(start, chunk length T) of each prefill call for an n-token prompt in a cache of S slots.

    Full MAX_PREFILL_CHUNK chunks, then the rest rounded up to a power of two (at least
    PREFILL_FLOOR). S is a power of two or the model's context, so a chunk never runs past the
    cache except at a context that is not a bucket multiple, where it is cut to fit.
    """
    chunks, start = [], 0
    while start < n:
        t = min(MAX_PREFILL_CHUNK, max(PREFILL_FLOOR, next_pow2(n - start)))
        t = min(t, cache_len - start)
        chunks.append((start, t))
        start += t
    return chunks


def cache_length(tokens: int, max_positions: int) -> int:
    """KV cache length S for sequences of up to `tokens` tokens: a power of two (>= 16) capped at
    the model's context."""
    return min(max(next_pow2(tokens), PREFILL_FLOOR), max_positions)


# ------------------------------------------------------------------------------------------------
# State


def init_state(cfg: ModelConfig, slots: int, length: int, dtype, eos_width: int) -> dict:
    """Fresh decode state (module docstring): B = slots idle slots, a cache of S = length."""
    b = slots
    knobs = {name: jnp.zeros((b,), dt) for name, dt in sampling.KNOB_DTYPES.items()}
    knobs["max_new"] = jnp.zeros((b,), jnp.int32)
    return {
        "cache": init_cache(cfg, b, length, dtype),
        "length": jnp.zeros((b,), jnp.int32),
        "token": jnp.zeros((b,), jnp.int32),
        "count": jnp.zeros((b,), jnp.int32),
        "done": jnp.ones((b,), bool),
        "seen": jnp.zeros((b, cfg.vocab_size), bool),
        "finite": jnp.ones((b,), bool),
        "knobs": knobs,
        "eos": jnp.full((b, eos_width), -1, jnp.int32),
    }


@functools.lru_cache(maxsize=None)
def _state_initializer(sharding):
    # Allocate the (possibly large) cache directly where it lives, never on the host first.
    return jax.jit(init_state, static_argnums=(0, 1, 2, 3, 4), out_shardings=sharding)


def new_state(cfg: ModelConfig, slots: int, length: int, dtype, eos_width: int,
              device: jax.Device, shardings=None) -> dict:
    """init_state, allocated on `device`, or with `shardings` (a pytree of shardings mirroring
    the state: model/sharding.py's state_shardings) across a mesh."""
    if shardings is not None:
        return jax.jit(init_state, static_argnums=(0, 1, 2, 3, 4), out_shardings=shardings)(
            cfg, slots, length, jnp.dtype(dtype), eos_width)
    sharding = jax.sharding.SingleDeviceSharding(device)
    return _state_initializer(sharding)(cfg, slots, length, jnp.dtype(dtype), eos_width)


# ------------------------------------------------------------------------------------------------
# The jitted programs


def prefill(params: dict, state: dict, tokens: jax.Array, slot: jax.Array, start: jax.Array,
            n_valid: jax.Array, last: jax.Array, knobs: dict, eos: jax.Array, *,
            cfg: ModelConfig, policy: Policy) -> tuple[dict, dict]:
    """Run one prompt chunk into slot `slot`; the last chunk samples the slot's first token.

    Args:
      params: model params on the device.
      state: decode state (module docstring).
      tokens: [1, T] int32 chunk (right-padded after n_valid).
      slot, start, n_valid: int32 scalars: the slot, the chunk's first position, real tokens.
      last: bool scalar, this is the prompt's last chunk.
      knobs: {name: [1]} the request's sampling knobs and "max_new".
      eos: [1, E] int32 the request's stop token ids.
      cfg, policy: static.

    Returns:
      (state, first): first = {"token": [1], "logprob": [1], "top_ids": [1, TOP_LOGPROBS],
      "top_logprobs": [1, TOP_LOGPROBS]} for the sampled token (meaningful when `last`).
    """
    TRACES["prefill"] += 1
    t = tokens.shape[1]
    vocab = cfg.vocab_size
    s = state["cache"]["k"].shape[3]
    first = start == 0
    h, cache = model_lib.apply(params, tokens, cfg, policy, cache=state["cache"],
                               pos=start[None], slot=slot)
    real = jnp.arange(t) < n_valid
    seen = jnp.where(first, False, state["seen"][slot])  # [V]
    seen = seen.at[jnp.where(real, tokens[0], vocab)].set(True, mode="drop")
    h_last = jax.lax.dynamic_index_in_dim(h[0], jnp.clip(n_valid - 1, 0, t - 1), 0,
                                          keepdims=False)  # [D]
    logits = model_lib.unembed(params, h_last[None], cfg, policy).astype(jnp.float32)  # [1, V]
    tok, row_finite = sampling.sample_checked(logits, seen[None], knobs,
                                              jnp.zeros((1,), jnp.int32), kernel=policy.kernel)
    length = start + n_valid
    is_eos = jnp.any(tok[0] == eos[0])
    done = ~last | is_eos | (knobs["max_new"][0] <= 1) | (length >= s)
    finite = ~last | row_finite[0]
    seen = jnp.where(last, seen.at[tok[0]].set(True), seen)
    row = {"length": length, "token": jnp.where(last, tok[0], 0),
           "count": last.astype(jnp.int32), "done": done, "seen": seen,
           "finite": jnp.where(first, True, state["finite"][slot]) & finite}
    new = {k: state[k].at[slot].set(v) for k, v in row.items()}
    new["knobs"] = {k: state["knobs"][k].at[slot].set(knobs[k][0]) for k in state["knobs"]}
    new["eos"] = state["eos"].at[slot].set(eos[0])
    new["cache"] = cache
    return new, dict(_logprobs(logits, tok, top=True), token=tok)


def decode(params: dict, state: dict, n_steps: jax.Array, stop: jax.Array, *, cfg: ModelConfig,
           policy: Policy, chunk: int, logprobs: bool, rows: int) -> tuple[dict, dict]:
    """Run up to `n_steps` (<= chunk) decode steps of the first `rows` slots, then return.

    The loop ends early when every slot is done. A slot finishes on an EOS token, at its
    max_new, when its cache row is full (length == S), or on a non-finite logit. Only slots
    0..rows-1 are computed (a bucket <= B: the scheduler fills the lowest free slot first, so
    a few live requests in a large engine cost a small batch); the others are left as they are.

    Args:
      params, cfg, policy: as in `prefill`.
      state: decode state.
      n_steps: int32 [] steps wanted this call (traced: any value reuses the program).
      stop: [B] bool slots the host ended (stop strings, cancellation, idle); marked done first.
      chunk: static size of the output buffers.
      logprobs: static; also return each token's logprob and the TOP_LOGPROBS most likely
        tokens of each step.
      rows: static number of leading slots to run.

    Returns:
      (state, out): out["tokens"] [rows, chunk] int32 holds the token each slot produced at
      each step, or -1; with `logprobs` also out["logprob"] [rows, chunk] its logprob and
      out["top_ids"], out["top_logprobs"] [rows, chunk, TOP_LOGPROBS].
    """
    TRACES["decode"] += 1
    b = rows
    s = state["cache"]["k"].shape[3]
    slots = {k: v for k, v in state.items() if k != "cache"}
    live = jax.tree.map(lambda x: x[:b], slots)
    live["done"] = live["done"] | stop[:b]

    def cond(carry):
        i, st, _, _ = carry
        return (i < n_steps) & ~jnp.all(st["done"])

    def body(carry):
        i, st, cache, out = carry
        h, cache = model_lib.apply(params, st["token"][:, None], cfg, policy, cache=cache,
                                   pos=st["length"])
        logits = model_lib.unembed(params, h[:, 0], cfg, policy).astype(jnp.float32)  # [b, V]
        active = ~st["done"]
        knobs = st["knobs"]
        tok, finite = sampling.sample_checked(logits, st["seen"], knobs, st["count"],
                                              kernel=policy.kernel)
        count = st["count"] + active
        length = st["length"] + active
        is_eos = jnp.any(tok[:, None] == st["eos"], axis=1)
        ended = is_eos | (count >= knobs["max_new"]) | (length >= s) | ~finite
        seen = st["seen"].at[jnp.arange(b), jnp.where(active, tok, cfg.vocab_size)].set(
            True, mode="drop")
        st = dict(st, length=length, count=count, seen=seen,
                  token=jnp.where(active, tok, st["token"]), done=st["done"] | (active & ended),
                  finite=st["finite"] & (finite | ~active))
        # The log_softmax over V costs ~5% of a large-vocabulary step: only when asked for.
        lp = _logprobs(logits, tok, top=True) if logprobs else {}
        lp["tokens"] = jnp.where(active, tok, -1)
        out = jax.tree.map(lambda o, v: jax.lax.dynamic_update_index_in_dim(o, v, i, 1), out, lp)
        return i + 1, st, cache, out

    out = {"tokens": jnp.full((b, chunk), -1, jnp.int32)}
    if logprobs:
        out["logprob"] = jnp.zeros((b, chunk), jnp.float32)
        out["top_ids"] = jnp.zeros((b, chunk, TOP_LOGPROBS), jnp.int32)
        out["top_logprobs"] = jnp.zeros((b, chunk, TOP_LOGPROBS), jnp.float32)
    _, live, cache, out = jax.lax.while_loop(cond, body,
                                             (jnp.int32(0), live, state["cache"], out))
    state = jax.tree.map(lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, 0, 0),
                         slots, live)
    state["cache"] = cache
    return state, out


def _logprobs(logits: jax.Array, tok: jax.Array, *, top: bool) -> dict:
    """{"logprob": [B]} of the chosen tokens, and with `top` the TOP_LOGPROBS best [B, k]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    out = {"logprob": jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]}
    if top:
        k = min(TOP_LOGPROBS, logits.shape[-1])
        values, ids = jax.lax.top_k(logp, k)
        pad = TOP_LOGPROBS - k  # a vocabulary smaller than TOP_LOGPROBS (test models)
        out["top_logprobs"] = jnp.pad(values, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        out["top_ids"] = jnp.pad(ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    return out


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation, one program per shape signature


def compiled(fn, args: tuple, static: dict, device, out_shardings=None) -> tuple[object, float]:
    """The compiled program of `fn` for these argument shapes, and the seconds spent compiling.

    Args:
      fn: `prefill` or `decode`.
      args: positional arguments (arrays or jax.ShapeDtypeStruct), the state second.
      static: keyword-only static arguments.
      device: where the arguments live (a Device or a Sharding; part of the key).
      out_shardings: for a sharded state, (state shardings, output sharding), so the state
        comes back laid out as it went in.
    """
    key = (fn.__name__, tuple(sorted(static.items())), device, _signature(args))
    exe = _COMPILED.get(key)
    if exe is not None:
        return exe, 0.0
    enable_compilation_cache()
    t0 = time.perf_counter()
    # kernel="auto" and the Pallas kernels read the target platform from the default device.
    target = (jax.default_device(device) if isinstance(device, jax.Device)
              else contextlib.nullcontext())
    with target:
        exe = lower(fn, args, static, out_shardings).compile()
    _COMPILED[key] = exe
    count = sum(k[0] == fn.__name__ for k in _COMPILED)
    if count == MANY_PROGRAMS:  # jax-notes §6.1: say so when shapes keep changing
        warnings.warn(f"bitnet_jax has compiled {count} `{fn.__name__}` programs in this process; "
                      "requests with many different slot counts, prompt buckets or models each "
                      "need their own (see bitnet_jax.warmup).", stacklevel=3)
    return exe, time.perf_counter() - t0


def lower(fn, args: tuple, static: dict, out_shardings=None) -> jax.stages.Lowered:
    """`fn` jitted with the state donated, lowered for these arguments."""
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    return jax.jit(fn, static_argnames=tuple(static), donate_argnames=("state",), **kw).lower(
        *args, **static)


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return (str(treedef),) + tuple(
        (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
         str(getattr(x, "sharding", None))) for x in leaves)


def abstract(tree, device):
    """ShapeDtypeStructs on `device` (a Device or a Sharding) mirroring `tree`."""
    sharding = (device if isinstance(device, jax.sharding.Sharding)
                else jax.sharding.SingleDeviceSharding(device))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def state_shape(cfg: ModelConfig, policy: Policy, slots: int, context: int, eos_width: int):
    """The decode state's ShapeDtypeStructs (no allocation)."""
    return jax.eval_shape(lambda: init_state(cfg, slots, context, jnp.dtype(policy.kv_cache),
                                             eos_width))


def program_args(params, cfg: ModelConfig, policy: Policy, *, slots: int, context: int,
                 chunk: int, eos_width: int, device, logprobs: bool = False,
                 state_shardings=None, rows: int | None = None) -> dict:
    """Abstract arguments and statics of the engine's programs for one configuration.

    Args:
      device: where inputs live (a Device, or a replicated Sharding on a mesh).
      state_shardings: the sharded state's layout (a pytree of shardings), or None.
      rows: the decode program's leading slots (default all).

    Returns:
      {"prefill": (args, static), "decode": (args, static)}; `chunk` is the prefill chunk T.
    """
    state = state_shape(cfg, policy, slots, context, eos_width)
    if state_shardings is None:
        state = abstract(state, device)
    else:
        state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                             state, state_shardings)
    scalar = abstract(np.int32(0), device)
    knobs = abstract({name: np.zeros((1,), dt) for name, dt in
                      dict(sampling.KNOB_DTYPES, max_new=np.int32).items()}, device)
    static = {"cfg": cfg, "policy": policy}
    pre = (params, state, abstract(np.zeros((1, chunk), np.int32), device), scalar, scalar,
           scalar, abstract(np.bool_(False), device), knobs,
           abstract(np.zeros((1, eos_width), np.int32), device))
    dec = (params, state, scalar, abstract(np.zeros((slots,), bool), device))
    return {"prefill": (pre, static),
            "decode": (dec, dict(static, chunk=DECODE_CHUNK, logprobs=logprobs,
                                 rows=rows or slots))}


def aot_lower(params, cfg: ModelConfig, policy: Policy, *, slots: int, context: int,
              device, chunk: int | None = None, logprobs: bool = False) -> dict:
    """Lower the engine's prefill and decode programs without running them.

    Args:
      params: the params or their ShapeDtypeStructs (placed on `device`).
      cfg, policy: the model config and the precision policy.
      slots: decode slots B; context: cache length S.
      device: a jax Device (a compile-only one works: jax.experimental.topologies).
      chunk: prefill chunk T (default min(MAX_PREFILL_CHUNK, S)).

    Returns:
      {"prefill": jax.stages.Lowered, "decode": jax.stages.Lowered}.
    """
    chunk = chunk or min(MAX_PREFILL_CHUNK, context)
    programs = program_args(params, cfg, policy, slots=slots, context=context, chunk=chunk,
                            eos_width=1, device=device, logprobs=logprobs)
    fns = {"prefill": prefill, "decode": decode}
    return {name: lower(fns[name], *programs[name]) for name in fns}
