"""Text generation: `generate`, `stream`, `warmup` (the host half of the engine).

A request goes through these steps:
  1. request.py turns prompts (text, chat conversations or token ids) into validated token ids.
  2. Up to 64 prompts share one batch. Rows are left-padded so that every prompt ends at the
     same cache slot. The batch is padded to a bucket of 1, 2, 4, ... rows.
  3. The jitted programs in engine.py do the work: prefill in chunks, then decode in chunks of
     up to DECODE_CHUNK steps. After each chunk, control returns to this module.
  4. Between chunks, the host decodes text incrementally and checks stop strings
     (detokenize.py), then yields text pieces. Each sequence ends with a `finish_reason`:
       "stop": an EOS token or a stop string
       "length": max_new_tokens reached
       "context_full": the KV cache or the model's context is full

The EOS token and the stop string are not part of the returned text or token ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime import engine
from bitnet_jax.runtime.detokenize import SequenceText
from bitnet_jax.runtime.placement import ensure_on_device, place_params, resolve_device, resolve_policy
from bitnet_jax.runtime.request import (Request, eos_array, eos_ids, one_prompt, request_knobs,
                                        sampling_kwargs)
from bitnet_jax.runtime.sampling import SamplingParams

MAX_BATCH = engine.BATCH_BUCKETS[-1]


@dataclasses.dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of one generation.

    Attributes:
      prefill_s: the prompt forward passes of the batch, compile time excluded.
      decode_s: from the end of prefill until this sequence finished, compile time excluded.
      compile_s: time spent compiling programs for this call (0 when all were cached).
      tokens_per_s: decode steps per second of this sequence. The first token is sampled
        during prefill, so it is not counted.
    """

    prefill_s: float
    decode_s: float
    compile_s: float
    tokens_per_s: float


@dataclasses.dataclass(frozen=True)
class Result:
    """One generated sequence.

    Attributes:
      text: the generated text. It does not include the prompt, the EOS token or a stop string.
        It is empty when the model has no tokenizer.
      token_ids: the generated token ids, without the EOS token.
      finish_reason: "stop", "length" or "context_full".
      prompt_tokens: the number of prompt tokens after encoding (and truncation).
      timings: see Timings.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    timings: Timings


# ------------------------------------------------------------------------------------------------
# Public API


def generate(model, prompts, max_new_tokens: int | Sequence[int] = 256,
             sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
             backend: str = "auto", stop: str | Sequence[str] | None = None, chat: bool = False,
             system: str | None = None, truncate: bool = False, policy=None,
             ignore_eos: bool = False, **sampling_kwargs) -> list[Result]:
    """Generate a continuation for each prompt.

    Args:
      model: a loading.Model (.config, .params, .tokenizer, .policy).
      prompts: a str, a list of token ids, a chat conversation (a list of {"role", "content"}
        dicts), or a list of any of those.
      max_new_tokens: the most tokens to generate, either one int or one per prompt.
      sampling: a SamplingParams, or one per prompt. Default: SamplingParams() (temperature
        0.8, seed 0).
      backend: "cpu", "gpu" or "auto".
      stop: strings that end a sequence when they appear in its text. The stop string itself is
        not returned.
      chat: format each text prompt as a user turn with the tokenizer's chat template.
      system: an optional system message for chat prompts.
      truncate: when a prompt plus max_new_tokens is longer than the context, keep only the
        prompt's last tokens: enough to leave room for max_new_tokens, but never fewer than
        half the context. Without truncate, a prompt longer than the context raises
        GenerationError.
      policy: a precision policy or preset name. Default: "gpu" on a GPU, otherwise the
        model's own policy.
      ignore_eos: do not stop at EOS tokens (benchmarks).
      **sampling_kwargs: SamplingParams fields (temperature=0, top_k=40, ...). They override
        the fields of `sampling`.

    Returns:
      One Result per prompt, in order.
    """
    req = Request.build(model, prompts, max_new_tokens, sampling, sampling_kwargs, backend,
                         stop, chat, system, truncate, policy, ignore_eos)
    results: list[Result] = []
    for lo in range(0, len(req.prompts), MAX_BATCH):
        results.extend(_drain(_run_batch(req, lo, lo + MAX_BATCH)))
    return results


def stream(model, prompt, max_new_tokens: int = 256, sampling: SamplingParams | None = None,
           **kwargs) -> "TextStream":
    """Generate for one prompt and yield text pieces as decode chunks come back.

    The arguments are the same as for `generate`, but `prompt` is a single prompt. The
    concatenated pieces equal the text of `generate`'s Result. Once the iterator is exhausted,
    `.result` holds that Result.
    """
    knobs = sampling_kwargs(kwargs)  # the rest are generate()'s keyword arguments
    req = Request.build(model, [prompt] if isinstance(prompt, str) else one_prompt(prompt),
                         max_new_tokens, sampling, knobs, **kwargs)
    return TextStream(_run_batch(req, 0, 1))


class TextStream:
    """An iterator over the text pieces of one generation. `.result` is set once it ends."""

    def __init__(self, events):
        self._events = events
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            try:
                _, piece = next(self._events)
            except StopIteration as done:
                if done.value is not None:  # None when next() is called again after the end
                    self.result = done.value[0]
                raise StopIteration from None
            if piece:
                return piece


def warmup(model, *, batch_sizes: Sequence[int] = (1,), prompt_lengths: Sequence[int] | None = None,
           max_new_tokens: int = 256, backend: str = "auto", policy=None,
           ignore_eos: bool = False) -> float:
    """Compile ahead of time the programs that requests of these shapes will use.

    Args:
      model: a loading.Model.
      batch_sizes: the numbers of prompts per call to prepare for. Each is rounded up to its
        batch bucket.
      prompt_lengths: the prompt lengths (in tokens) to prepare for. Default: every prefill
        bucket up to the largest single chunk.
      max_new_tokens: the max_new_tokens of the requests. It fixes the cache length bucket.
      backend, policy, ignore_eos: as in `generate`.

    Returns:
      Seconds spent compiling (near 0 when everything was already cached).
    """
    device = resolve_device(backend)
    policy = resolve_policy(device, policy, model.policy)
    params = place_params(model, device, policy)
    cfg = model.config
    eos = eos_array(eos_ids(model, ignore_eos))
    total = 0.0
    for n in batch_sizes:
        b = engine.batch_bucket(min(int(n), MAX_BATCH))
        tmax = engine.max_prefill_chunk(b)
        lengths = prompt_lengths or [engine.PREFILL_FLOOR << i for i in
                                     range((tmax // engine.PREFILL_FLOOR).bit_length())]
        knobs = request_knobs([SamplingParams()] * b, [max_new_tokens] * b)
        for length in lengths:
            length = min(int(length), cfg.max_position_embeddings)
            s = engine.cache_length(length, b, max_new_tokens, cfg.max_position_embeddings)
            state = jax.eval_shape(lambda: engine.init_state(
                cfg, np.zeros(b, np.int32), np.zeros(b, bool), s, policy.kv_cache))
            abs_state, abs_knobs, abs_eos = engine.abstract((state, knobs, eos), device)
            scalar = engine.abstract(np.int32(0), device)
            static = {"cfg": cfg, "policy": policy}
            for _, t in engine.prefill_chunks(length, b, s):
                tokens = engine.abstract(np.zeros((b, t), np.int32), device)
                args = (params, abs_state, tokens, scalar, abs_knobs, abs_eos)
                total += engine.compiled(engine.prefill, args, static, device)[1]
            args = (params, abs_state, abs_knobs, abs_eos, scalar,
                    engine.abstract(np.zeros(b, bool), device))
            total += engine.compiled(engine.decode_chunk, args,
                                     dict(static, chunk=engine.DECODE_CHUNK), device)[1]
    return total


# ------------------------------------------------------------------------------------------------
# The host loop


def _run_batch(req: Request, lo: int, hi: int):
    """Generator: yields (row, text piece) after each device call and returns list[Result]."""
    cfg, device, policy = req.model.config, req.device, req.policy
    prompts, max_new = req.prompts[lo:hi], req.max_new[lo:hi]
    n = len(prompts)
    b = engine.batch_bucket(n)
    end = max(len(p) for p in prompts)
    s = engine.cache_length(end, b, max(max_new), cfg.max_position_embeddings)
    tokens = np.full((b, end), engine.PAD_ID, np.int32)
    starts = np.full(b, end - 1, np.int32)
    done = np.ones(b, bool)  # padding rows never sample
    for r, p in enumerate(prompts):
        tokens[r, end - len(p):] = p
        starts[r] = end - len(p)
        done[r] = max_new[r] == 0
    pad = b - n
    knobs = request_knobs(req.sampling[lo:hi] + [SamplingParams(temperature=0.0)] * pad,
                   max_new + [1] * pad)
    knobs, eos = ensure_on_device((knobs, eos_array(req.eos)), device)
    eos_set = set(req.eos)
    tok = req.model.tokenizer
    rows = [SequenceText(m, tok, req.stops) for m in max_new]
    static = {"cfg": cfg, "policy": policy}
    clock = _Clock()

    if not done[:n].all():
        state = engine.new_state(cfg, starts, done, s, policy.kv_cache, device)
        for start, t in engine.prefill_chunks(end, b, s):
            chunk = np.full((b, t), engine.PAD_ID, np.int32)
            width = min(t, end - start)
            chunk[:, :width] = tokens[:, start:start + width]
            args = (req.params, state, *ensure_on_device((chunk, np.int32(end)), device), knobs,
                    eos)
            exe, seconds = engine.compiled(engine.prefill, args, static, device)
            clock.compile_s += seconds
            with clock.prefill():
                state = jax.block_until_ready(exe(*args))
        peek = _peek(state)
        _check_finite(peek, rows, lo, policy)
        for r, row in enumerate(rows):
            if not done[r]:
                row.take(int(peek["token"][r]), eos_set)
        clock.start_decode()
        yield from clock.paused(_pieces(rows))
        for k in itertools.count():
            live = [row for row in rows if row.finish is None]
            if not live:
                break
            if peek["index"] >= s:  # no free cache slot for the next token
                for row in live:
                    row.end("context_full", clock.decode_s())
                break
            want = max(row.max_new - row.produced for row in live)
            # Short first chunks make streaming start promptly; n_steps is traced, no recompile.
            n_steps = min(engine.DECODE_CHUNK, 2 << k, want, s - int(peek["index"]))
            stop = np.array([row.finish is not None for row in rows] + [True] * pad)
            args = (req.params, state, knobs, eos,
                    *ensure_on_device((np.int32(n_steps), stop), device))
            exe, seconds = engine.compiled(engine.decode_chunk, args,
                                           dict(static, chunk=engine.DECODE_CHUNK), device)
            clock.compile_s += seconds
            clock.exclude(seconds)
            state, out = exe(*args)
            out, peek = jax.device_get((out, _peek_tree(state)))
            _check_finite(peek, rows, lo, policy)
            for r, row in enumerate(rows):
                for t in out[r]:
                    if row.finish is not None:
                        break
                    if t >= 0:
                        row.take(int(t), eos_set, clock.decode_s())
            yield from clock.paused(_pieces(rows))
    for row in rows:  # max_new_tokens=0 rows
        if row.finish is None:
            row.end("length", 0.0)
    yield from _pieces(rows)
    return [_result(row, len(p), clock) for row, p in zip(rows, prompts)]


def _peek_tree(state: dict) -> dict:
    return {k: state[k] for k in ("token", "done", "finite", "index")}


def _peek(state: dict) -> dict:
    return jax.device_get(_peek_tree(state))


def _check_finite(peek: dict, rows: list, lo: int, policy) -> None:
    for r, row in enumerate(rows):
        if not peek["finite"][r]:
            raise GenerationError(
                f"the model produced non-finite logits (NaN or inf) for prompt {lo + r} after "
                f"{row.produced} generated tokens; the weights are corrupt or overflow in "
                f"{policy.compute_dtype}: check the checkpoint or try policy='cpu' (float32).")


def _pieces(rows: list):
    for r, row in enumerate(rows):
        piece = row.pop_piece()
        if piece:
            yield r, piece


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


class _Clock:
    """Prefill/decode/compile seconds, minus the time the consumer of a stream held us."""

    def __init__(self):
        self.compile_s = 0.0
        self.prefill_s = 0.0
        self._decode_t0 = None
        self._excluded = 0.0

    @contextlib.contextmanager
    def prefill(self):
        t0 = time.perf_counter()
        yield
        self.prefill_s += time.perf_counter() - t0

    def start_decode(self):
        self._decode_t0 = time.perf_counter()

    def exclude(self, seconds: float):
        self._excluded += seconds

    def decode_s(self) -> float:
        if self._decode_t0 is None:
            return 0.0
        return max(time.perf_counter() - self._decode_t0 - self._excluded, 0.0)

    def paused(self, events):
        for event in events:
            t0 = time.perf_counter()
            yield event
            self._excluded += time.perf_counter() - t0



def _result(row: SequenceText, prompt_tokens: int, clock: _Clock) -> Result:
    steps = max(row.produced - 1, 0)
    rate = steps / row.decode_s if row.decode_s > 0 else 0.0
    timings = Timings(clock.prefill_s, row.decode_s, clock.compile_s, rate)
    return Result(row.text, list(row.ids), row.finish, prompt_tokens, timings)
