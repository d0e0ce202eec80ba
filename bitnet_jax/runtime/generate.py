"""Text generation: `generate`, `stream`, `warmup`, on the serving engine (scheduler.py).

A request goes through these steps:
  1. request.py turns prompts (text, chat conversations or token ids) into validated token ids.
  2. An Engine with one slot per prompt (up to 64; more prompts wait in its queue and take the
     slots that free up) prefills each prompt into its slot in chunks, then decodes every slot
     together in chunks of up to DECODE_CHUNK steps (engine.py), in this thread.
  3. Between chunks the engine decodes text incrementally and checks stop strings
     (detokenize.py). Each sequence ends with a `finish_reason`:
       "stop": an EOS token or a stop string
       "length": max_new_tokens reached
       "context_full": the KV cache or the model's context is full

The EOS token and the stop string are not part of the returned text or token ids. Each
prompt's result is the same alone, in any batch and in the server: a row's numbers never depend
on the other slots, and its samples only on its own seed and step (sampling.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime import engine
from bitnet_jax.runtime.request import Request, one_prompt, sampling_kwargs
from bitnet_jax.runtime.sampling import SamplingParams
from bitnet_jax.runtime.scheduler import Engine

MAX_BATCH = engine.BATCH_BUCKETS[-1]


@dataclasses.dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of one generation.

    Attributes:
      prefill_s: the device calls that prefilled this prompt, compile time excluded.
      decode_s: the decode calls this sequence took part in, compile time excluded.
      compile_s: time spent compiling programs this sequence waited for (0 when all were
        cached).
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
    eng, handles = _submit_all(req)
    eng.run_until_done(handles)
    return [_result(h) for h in handles]


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
    return TextStream(*_submit_all(req))


class TextStream:
    """An iterator over the text pieces of one generation. `.result` is set once it ends."""

    def __init__(self, eng: Engine, handles: list):
        self._engine, (self._handle,) = eng, handles
        self.result: Result | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            event = self._handle.poll()
            if event is None:
                if self._handle.finished or self.result is not None:
                    raise StopIteration
                self._engine.step()
                continue
            if event.finish_reason is not None:
                self.result = _result(self._handle)
            if event.text:
                return event.text


def warmup(model, *, batch_sizes: Sequence[int] = (1,), prompt_lengths: Sequence[int] | None = None,
           max_new_tokens: int = 256, backend: str = "auto", policy=None,
           ignore_eos: bool = False) -> float:
    """Compile ahead of time the programs that requests of these shapes will use.

    Args:
      model: a loading.Model.
      batch_sizes: the numbers of prompts per call to prepare for. Each is rounded up to its
        batch bucket.
      prompt_lengths: the prompt lengths (in tokens) to prepare for. Default: every power of
        two from 16 up to the largest prefill chunk.
      max_new_tokens: the max_new_tokens of the requests. It fixes the cache length bucket.
      backend, policy: as in `generate`.
      ignore_eos: accepted as in `generate`; EOS ids are per-slot values, so it does not change
        the programs.

    Returns:
      Seconds spent compiling (near 0 when everything was already cached).
    """
    cfg = model.config
    total = 0.0
    lengths = prompt_lengths or [engine.PREFILL_FLOOR << i for i in range(
        (engine.MAX_PREFILL_CHUNK // engine.PREFILL_FLOOR).bit_length())]
    for n in batch_sizes:
        for length in lengths:
            length = min(int(length), cfg.max_position_embeddings)
            eng = Engine(model, slots=min(int(n), MAX_BATCH), backend=backend, policy=policy,
                         context=length + max_new_tokens, interleave=False)
            total += eng.warmup(prompt_lengths=[length], logprobs=False)
    return total


# ------------------------------------------------------------------------------------------------
# On the engine


def _submit_all(req: Request) -> tuple[Engine, list]:
    """An engine sized for this request (one slot per prompt, up to MAX_BATCH; a cache that
    holds the longest prompt plus its max_new_tokens) with every prompt submitted."""
    # Prompts padded to their prefill chunks, so that nearby lengths share one cache bucket.
    longest = max(sum(t for _, t in engine.prefill_plan(len(p), 1 << 30)) + m
                  for p, m in zip(req.prompts, req.max_new))
    eng = Engine(req.model, slots=min(len(req.prompts), MAX_BATCH), context=longest,
                 device=req.device, policy=req.policy, interleave=False)
    handles = [eng.submit(p, max_new_tokens=m, sampling=s, stop=req.stops,
                          ignore_eos=req.ignore_eos)
               for p, m, s in zip(req.prompts, req.max_new, req.sampling)]
    return eng, handles


def _result(handle) -> Result:
    if handle.finish_reason == "error":
        raise GenerationError(handle.error)
    u = handle.usage
    steps = max(u.completion_tokens - 1, 0)
    rate = steps / u.decode_s if u.decode_s > 0 else 0.0
    timings = Timings(u.prefill_s, u.decode_s, u.compile_s, rate)
    return Result(handle.text, list(handle.token_ids), handle.finish_reason, u.prompt_tokens,
                  timings)
