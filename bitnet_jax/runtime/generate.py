"""Text generation: `generate`, `stream`, `warmup`, `benchmark` (the host half of the engine).

A request goes through these steps:
  1. Prompts (text, chat conversations or token ids) become token ids, which are validated
     against the vocabulary and the context length.
  2. Up to 64 prompts share one batch. Rows are left-padded so that every prompt ends at the
     same cache slot. The batch is padded to a bucket of 1, 2, 4, ... rows.
  3. The jitted programs in engine.py do the work: prefill in chunks, then decode in chunks of
     up to DECODE_CHUNK steps. After each chunk, control returns to this module.
  4. Between chunks, the host decodes text incrementally and checks stop strings, then yields
     text pieces. Each sequence ends with a `finish_reason`:
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

from bitnet_jax.runtime import engine
from bitnet_jax.runtime.placement import (describe, ensure_on_device, place_params, resolve_device,
                                resolve_policy)
from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime.sampling import SamplingParams, knob_arrays

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
    req = _Request.build(model, prompts, max_new_tokens, sampling, sampling_kwargs, backend,
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
    knobs = _sampling_kwargs(kwargs)  # the rest are generate()'s keyword arguments
    req = _Request.build(model, [prompt] if isinstance(prompt, str) else _one(prompt),
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
    eos = _eos_array(_eos_ids(model, ignore_eos))
    total = 0.0
    for n in batch_sizes:
        b = engine.batch_bucket(min(int(n), MAX_BATCH))
        tmax = engine.max_prefill_chunk(b)
        lengths = prompt_lengths or [engine.PREFILL_FLOOR << i for i in
                                     range((tmax // engine.PREFILL_FLOOR).bit_length())]
        knobs = _knobs([SamplingParams()] * b, [max_new_tokens] * b)
        for length in lengths:
            length = min(int(length), cfg.max_position_embeddings)
            s = engine.cache_length(length, b, max_new_tokens, cfg.max_position_embeddings)
            state = jax.eval_shape(lambda: engine.init_state(
                cfg, np.zeros(b, np.int32), np.zeros(b, bool), s, policy.compute))
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


def benchmark(model, *, prompt_tokens: int = 128, gen_tokens: int = 64, batch: int = 1,
              backend: str = "auto", policy=None, seed: int = 0) -> dict:
    """Measure prefill and decode throughput on random prompts, after a warm-up run.

    Returns:
      A dict with prefill_tokens_per_s, decode_tokens_per_s (all rows together), the seconds
      behind them, compile_s (from the warm-up run), batch, the token counts and the device.
    """
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, model.config.vocab_size, (batch, prompt_tokens)).tolist()
    kwargs = dict(max_new_tokens=gen_tokens, sampling=SamplingParams(temperature=0.0),
                  backend=backend, policy=policy, ignore_eos=True)
    first = generate(model, prompts, **kwargs)
    results = generate(model, prompts, **kwargs)
    prefill_s = results[0].timings.prefill_s
    decode_s = max(r.timings.decode_s for r in results)
    steps = sum(len(r.token_ids) - 1 for r in results)
    device = resolve_device(backend)
    return {
        "batch": batch,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_tokens_per_s": batch * prompt_tokens / prefill_s if prefill_s else 0.0,
        "decode_tokens_per_s": steps / decode_s if decode_s else 0.0,
        "compile_s": first[0].timings.compile_s,
        "backend": device.platform,
        "device": describe(device),
        "policy": resolve_policy(device, policy, model.policy).compute_dtype,
        "jax_version": jax.__version__,
    }


# ------------------------------------------------------------------------------------------------
# Request preparation


@dataclasses.dataclass
class _Request:
    model: object
    prompts: list[list[int]]
    max_new: list[int]
    sampling: list[SamplingParams]
    stops: tuple[str, ...]
    eos: tuple[int, ...]
    device: object
    policy: object
    params: dict

    @classmethod
    def build(cls, model, prompts, max_new_tokens, sampling, sampling_kwargs, backend="auto",
              stop=None, chat=False, system=None, truncate=False, policy=None, ignore_eos=False):
        items = _prompt_list(prompts)
        n = len(items)
        max_new = _per_prompt(max_new_tokens, n, "max_new_tokens")
        for m in max_new:
            if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 0:
                raise GenerationError(f"max_new_tokens={m!r} must be an integer >= 0.")
        if sampling is None:
            sampling = SamplingParams()
        sampling = [dataclasses.replace(s, **sampling_kwargs) if sampling_kwargs else s
                    for s in _per_prompt(sampling, n, "sampling")]
        tok = model.tokenizer
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise GenerationError("stop strings must be non-empty strings.")
        if stops and tok is None:
            raise GenerationError("stop strings need a tokenizer; this model has none.")
        if system is not None and not chat:
            raise GenerationError("system= only applies to chat prompts; pass chat=True too.")
        cfg = model.config
        ids = [_validate(_encode(item, tok, chat, system), i, cfg, max_new[i], truncate)
               for i, item in enumerate(items)]
        device = resolve_device(backend)
        policy = resolve_policy(device, policy, model.policy)
        return cls(model, ids, [int(m) for m in max_new], sampling, stops,
                   _eos_ids(model, ignore_eos), device, policy,
                   place_params(model, device, policy))


def _sampling_kwargs(kwargs: dict) -> dict:
    """Split SamplingParams fields out of `kwargs` (in place) for stream()."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def _one(prompt):
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], (list, tuple, str)):
        raise GenerationError("stream() takes one prompt; use generate() for several.")
    return [prompt]


def _prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a str, a list of token ids, a conversation, or "
                              "a non-empty list of those.")
    if isinstance(prompts[0], (int, np.integer, dict)):
        return [list(prompts)]  # one token-id prompt or one conversation
    return list(prompts)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise GenerationError(f"{name} has {len(value)} entries for {n} prompts.")
        return list(value)
    return [value] * n


def _encode(item, tok, chat: bool, system: str | None) -> list[int]:
    is_conversation = isinstance(item, (list, tuple)) and item and isinstance(item[0], dict)
    if isinstance(item, str) or is_conversation:
        if tok is None:
            raise GenerationError("this model has no tokenizer, so text prompts cannot be "
                                  "encoded; pass token ids or load a model with tokenizer files.")
        if not (chat or is_conversation):
            return list(tok.encode(item, add_special=True))
        messages = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
        if system is not None and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}] + messages
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return list(tok.encode(text, add_special=False, parse_special=True))
    if chat:
        raise GenerationError("chat=True needs text prompts or conversations, not token ids.")
    try:
        return [int(t) for t in item]
    except (TypeError, ValueError):
        raise GenerationError(f"prompt {item!r:.60} is neither text nor a list of token ids.") \
            from None


def _validate(ids: list[int], i: int, cfg, max_new: int, truncate: bool) -> list[int]:
    if not ids:
        raise GenerationError(f"prompt {i} is empty after encoding; give at least one token.")
    bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise GenerationError(f"prompt {i} holds token id {bad}, outside the model's vocabulary "
                              f"[0, {cfg.vocab_size}).")
    context = cfg.max_position_embeddings
    if truncate and len(ids) + max_new > context:
        ids = ids[-max(context - max_new, context // 2, 1):]
    if len(ids) > context:
        raise GenerationError(f"prompt {i} has {len(ids)} tokens but the model's context holds "
                              f"{context} (max_position_embeddings); shorten it or pass "
                              "truncate=True to keep its last tokens.")
    return ids


def _eos_ids(model, ignore_eos: bool) -> tuple[int, ...]:
    if ignore_eos:
        return ()
    ids = set(model.config.eos_ids)
    if model.tokenizer is not None:
        ids |= set(model.tokenizer.eos_ids)
    return tuple(sorted(t for t in ids if 0 <= t < model.config.vocab_size))


def _eos_array(eos: tuple[int, ...]) -> np.ndarray:
    return np.array(eos or (-1,), np.int32)  # -1 never matches a sampled token


def _knobs(sampling: list[SamplingParams], max_new: list[int]) -> dict:
    knobs = knob_arrays(sampling)
    knobs["max_new"] = np.array(max_new, np.int32)
    return knobs


# ------------------------------------------------------------------------------------------------
# The host loop


def _run_batch(req: _Request, lo: int, hi: int):
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
    knobs = _knobs(req.sampling[lo:hi] + [SamplingParams(temperature=0.0)] * pad,
                   max_new + [1] * pad)
    knobs, eos = ensure_on_device((knobs, _eos_array(req.eos)), device)
    eos_set = set(req.eos)
    tok = req.model.tokenizer
    rows = [_Row(m, tok, req.stops) for m in max_new]
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
                        row.take(int(t), eos_set, clock)
            yield from clock.paused(_pieces(rows))
    for row in rows:  # max_new_tokens=0 rows
        if row.finish is None:
            row.end("length", 0.0)
    yield from _pieces(rows)
    return [row.result(len(p), clock) for row, p in zip(rows, prompts)]


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


class _Row:
    """Host-side progress of one sequence: ids, text, stop strings, what was already yielded."""

    def __init__(self, max_new: int, tokenizer, stops: tuple[str, ...]):
        self.max_new = max_new
        self.stops = stops
        self.decoder = _incremental_decoder(tokenizer) if tokenizer is not None else None
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.produced = 0  # tokens the device sampled for this row, EOS included
        self.finish: str | None = None
        self.decode_s = 0.0

    def take(self, token: int, eos: set, clock: _Clock | None = None) -> None:
        self.produced += 1
        elapsed = clock.decode_s() if clock else 0.0
        if token in eos:
            self.end("stop", elapsed)
            return
        self.ids.append(token)
        if self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.push(token)
            if self._cut_at_stop(before):
                self.finish, self.decode_s = "stop", elapsed
                return
        if self.produced >= self.max_new:
            self.end("length", elapsed)

    def end(self, reason: str, decode_s: float) -> None:
        if self.decoder is not None:
            before = len(self.text)
            self.text += self.decoder.flush()
            if self._cut_at_stop(before):
                reason = "stop"
        self.finish, self.decode_s = reason, decode_s

    def _cut_at_stop(self, before: int) -> bool:
        if not self.stops:
            return False
        longest = max(len(s) for s in self.stops)
        start = max(0, before - longest + 1)
        hits = [p for p in (self.text.find(s, start) for s in self.stops) if p >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def pop_piece(self) -> str:
        """Text not yet yielded, holding back a tail that could begin a stop string."""
        safe = len(self.text)
        if self.finish is None and self.stops:
            for k in range(min(len(self.text), max(len(s) for s in self.stops) - 1), 0, -1):
                if any(s.startswith(self.text[-k:]) for s in self.stops):
                    safe -= k
                    break
        piece = self.text[self.emitted:max(safe, self.emitted)]
        self.emitted += len(piece)
        return piece

    def result(self, prompt_tokens: int, clock: _Clock) -> Result:
        steps = max(self.produced - 1, 0)
        rate = steps / self.decode_s if self.decode_s > 0 else 0.0
        timings = Timings(clock.prefill_s, self.decode_s, clock.compile_s, rate)
        return Result(self.text, list(self.ids), self.finish, prompt_tokens, timings)


def _incremental_decoder(tokenizer):
    try:
        from bitnet_jax.tokenizer import IncrementalDecoder, Tokenizer
    except ImportError:
        return _WindowDecoder(tokenizer)
    if isinstance(tokenizer, Tokenizer):
        return IncrementalDecoder(tokenizer)
    return _WindowDecoder(tokenizer)


class _WindowDecoder:
    """Incremental detokenizer for any object with decode(ids): re-decodes a short window.

    Text is released only when the window's decoding does not end in U+FFFD, so a multi-byte
    character split across tokens is never emitted half-made (the approach of HF TGI).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here are already emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
