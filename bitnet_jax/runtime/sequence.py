"""The host-side progress of one request in the engine: `Sequence`.

The scheduler (scheduler.py) owns the queue and the slots; a Sequence owns one request's
prompt, settings, prefill plan and text, and turns the tokens each device call produced into
the `Event`s its Handle receives (handle.py).
"""

from __future__ import annotations

import dataclasses

from bitnet_jax.runtime.detokenize import SequenceText
from bitnet_jax.runtime.handle import Event, Handle, TokenLogprob
from bitnet_jax.runtime.sampling import SamplingParams


@dataclasses.dataclass
class Sequence:
    """One request between submit and finish.

    Attributes:
      handle: what the caller holds.
      prompt: validated token ids.
      max_new: the most tokens to generate.
      sampling: the request's knobs.
      eos: stop token ids (empty with ignore_eos).
      text: incremental detokenization and stop strings.
      logprobs: None, or how many top alternatives to report per token.
      deadline: perf_counter time after which the request times out, or None.
      slot: the decode slot while it holds one, else -1.
      plan: prefill chunks (start, T) still to run.
      decoding: the prompt is prefilled and the slot decodes.
    """

    handle: Handle
    prompt: list[int]
    max_new: int
    sampling: SamplingParams
    eos: tuple[int, ...]
    text: SequenceText
    logprobs: int | None
    deadline: float | None
    slot: int = -1
    plan: list = dataclasses.field(default_factory=list)
    decoding: bool = False

    def ending(self, now: float) -> str | None:
        """"cancelled" or "timeout" when the request must end now, else None."""
        if self.handle.cancelled:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None

    def take(self, tokens: list[int], lp: dict | None, *, done: bool, full: bool) -> bool:
        """Feed the tokens one device call produced; push an event. True when it finished.

        Args:
          tokens: the sampled tokens in order (EOS included).
          lp: {"logprob": [n], "top_ids": [n, k], "top_logprobs": [n, k]} per token, or None.
          done: the device marked the slot done (max_new, EOS or a full cache).
          full: the slot's cache row is full.
        """
        row = self.text
        eos = set(self.eos)
        ids_before = len(row.ids)
        logprobs = []
        for i, token in enumerate(tokens):
            if row.finish is not None:
                break
            row.take(token, eos)
            if self.logprobs is not None and lp is not None and token not in eos:
                top = tuple((int(a), float(b)) for a, b in
                            zip(lp["top_ids"][i][:self.logprobs],
                                lp["top_logprobs"][i][:self.logprobs]))
                logprobs.append(TokenLogprob(token, float(lp["logprob"][i]), top))
        if row.finish is None and done:  # the device ended it: max_new, EOS or a full cache
            row.end("context_full" if full and row.produced < row.max_new else "length", 0.0)
        self.handle.usage.completion_tokens = row.produced
        new_ids = tuple(row.ids[ids_before:])
        lps = tuple(logprobs[:len(new_ids)]) if self.logprobs is not None else None
        piece = row.pop_piece()
        if row.finish is None:
            if piece or new_ids:
                self.handle.push(Event(piece, new_ids, lps))
            return False
        self.handle.push(Event(piece, new_ids, lps, finish_reason=row.finish))
        return True

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the request now (cancelled, timeout, error, or length for max_new_tokens=0)."""
        if self.handle.finished:
            return
        self.text.end(reason, 0.0)
        self.handle.push(Event(self.text.pop_piece(), (),
                               () if self.logprobs is not None else None,
                               finish_reason=reason, error=error))
