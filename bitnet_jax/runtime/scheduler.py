"""The host half of the serving engine: a queue, B decode slots, and the step loop.

`Engine` is the one engine behind `generate`, `stream`, the chat CLI and the HTTP server.
Requests wait in a bounded FIFO queue; a free slot takes the oldest one, whose prompt is
prefilled in chunks straight into the slot's cache row (engine.prefill); then the slot decodes
with every other live slot in chunks of up to DECODE_CHUNK steps (engine.decode). A finished,
cancelled or timed-out request frees its slot at once; the next request joins at the next step.
Slot, positions and knobs are traced values: requests join and leave with no recompilation.

One `step()`:
  1. drop cancelled / timed-out requests (queued or in a slot) and admit queued ones to free
     slots;
  2. run one prefill chunk (at most MAX_PREFILL_CHUNK tokens) of the oldest prefilling request;
  3. run one decode chunk for the decoding slots. With `interleave=True` (the server) it is
     short, `stream_steps` steps: text reaches clients every few tokens, and a long prompt is
     prefilled between decode chunks instead of stalling running streams for its whole
     prefill. With `interleave=False` (batch `generate`) decoding waits until every admitted
     prompt is prefilled, so the batch decodes together, DECODE_CHUNK steps per call.
After each device call the host decodes text incrementally, checks stop strings
(detokenize.py) and pushes events to each request's Handle (handle.py).

`step()` runs in the caller's thread (generate) or in the engine's own thread (`start()`, the
server); `submit()` and `Handle.cancel()` are safe from any thread.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time

import jax
import numpy as np

from bitnet_jax.errors import BitNetError, GenerationError
from bitnet_jax.runtime import engine
from bitnet_jax.runtime.detokenize import SequenceText
from bitnet_jax.runtime.handle import Handle
from bitnet_jax.runtime.placement import place_params, resolve_device, resolve_policy
from bitnet_jax.runtime.request import eos_ids, request_knobs
from bitnet_jax.runtime.runner import Runner
from bitnet_jax.runtime.sampling import SamplingParams
from bitnet_jax.runtime.sequence import Sequence

STREAM_STEPS = 2  # a decode call's host round trip is < 1 ms; a large-model step 10-100 ms


class QueueFull(BitNetError):
    """The engine's request queue is full; retry later."""


class Engine:
    """B decode slots on one device (or mesh) serving requests as they come.

    Args:
      model: a loaded Model (.config, .params, .tokenizer, .policy).
      slots: decode slots; rounded up to a batch bucket (1, 2, 4, ..., 64).
      context: KV cache length S per slot (default: the model's context); rounded to a bucket.
      backend, policy: as in `generate`.
      max_queue: requests that may wait for a slot; `submit` raises QueueFull beyond it.
      interleave: prefill chunks alternate with decode chunks (module docstring).
      stream_steps: decode steps per call with `interleave` (1..DECODE_CHUNK).
      device: run on this device instead of resolving `backend`.
    """

    def __init__(self, model, *, slots: int = 8, context: int | None = None,
                 backend: str = "auto", policy=None, max_queue: int = 1024,
                 interleave: bool = True, device: jax.Device | None = None,
                 stream_steps: int = STREAM_STEPS):
        if not 1 <= int(slots) <= engine.BATCH_BUCKETS[-1]:
            raise GenerationError(f"slots={slots} must be between 1 and "
                                  f"{engine.BATCH_BUCKETS[-1]}.", cli_message=(
                                      f"--slots {slots} must be between 1 and "
                                      f"{engine.BATCH_BUCKETS[-1]}."))
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.device = device or resolve_device(backend)
        self.policy = resolve_policy(self.device, policy, model.policy)
        self.params = place_params(model, self.device, self.policy)
        self.slots = engine.batch_bucket(int(slots))
        self.context = engine.cache_length(context or cfg.max_position_embeddings,
                                           cfg.max_position_embeddings)
        self.max_queue, self.interleave = max_queue, interleave
        self.stream_steps = max(1, min(int(stream_steps), engine.DECODE_CHUNK))
        self.default_eos = eos_ids(model)
        self.eos_width = max(len(self.default_eos), 1)
        self.runner = Runner(cfg, self.policy, self.params, self.device, slots=self.slots,
                             context=self.context, eos_width=self.eos_width)
        self._queue: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence | None] = [None] * self.slots
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- submitting ----------------------------------------------------------------------------

    def submit(self, prompt: list[int], *, max_new_tokens: int,
               sampling: SamplingParams | None = None, stop: tuple[str, ...] = (),
               ignore_eos: bool = False, logprobs: int | None = None,
               timeout: float | None = None) -> Handle:
        """Queue one request of validated token ids; returns its Handle at once.

        Args:
          prompt: token ids (non-empty, inside the vocabulary).
          max_new_tokens: the most tokens to generate (0 finishes at once).
          sampling: SamplingParams (default greedy).
          stop: stop strings (need a tokenizer).
          ignore_eos: do not stop at EOS tokens.
          logprobs: None, or how many top alternatives (0..20) to report per token.
          timeout: seconds from now after which the request ends with "timeout".

        Raises:
          GenerationError for a prompt longer than the context; QueueFull when the queue is
          full or the engine is shutting down.
        """
        if len(prompt) > self.context:
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens but the engine's context holds "
                f"{self.context}; shorten the prompt or raise the context.")
        if logprobs is not None and not 0 <= logprobs <= engine.TOP_LOGPROBS:
            raise GenerationError(f"top logprobs={logprobs} must be in [0, "
                                  f"{engine.TOP_LOGPROBS}].")
        handle = Handle(next(self._ids), len(prompt))
        seq = Sequence(handle, list(prompt), int(max_new_tokens),
                   sampling or SamplingParams(temperature=0.0),
                   () if ignore_eos else self.default_eos,
                   SequenceText(int(max_new_tokens), self.model.tokenizer, tuple(stop)),
                   logprobs, None if timeout is None else time.perf_counter() + timeout)
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down; retry on another replica.")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry "
                                "later.")
            self._queue.append(seq)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        """{"slots", "busy_slots", "queue_depth"} right now."""
        with self._lock:
            return {"slots": self.slots, "queue_depth": len(self._queue),
                    "busy_slots": sum(s is not None for s in self._active)}

    # -- running -------------------------------------------------------------------------------

    def idle(self) -> bool:
        """No request waits or holds a slot."""
        with self._lock:  # a Condition's RLock: _loop calls this holding it
            return not self._queue and all(s is None for s in self._active)

    def run_until_done(self, handles: list[Handle]) -> None:
        """Step in this thread until every handle has finished (generate)."""
        while not all(h.finished for h in handles):
            self.step()

    def start(self) -> None:
        """Run the step loop in a background thread (the server)."""
        self._thread = threading.Thread(target=self._loop, name="bitnet-engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; finish (drain) or cancel the ones in flight; stop the thread."""
        with self._lock:
            self._stopping = True
            if not drain:
                for seq in list(self._queue) + [s for s in self._active if s is not None]:
                    seq.handle.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # drain took too long: cancel what is left
                with self._lock:
                    for seq in list(self._queue) + [s for s in self._active if s is not None]:
                        seq.handle.cancel()
                self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle():
                    if self._stopping:
                        return
                    self._lock.wait(0.5)
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - end every request, keep the server up
                self._fail_all(f"internal engine error: {type(exc).__name__}: {exc}")

    def _fail_all(self, message: str) -> None:
        with self._lock:
            seqs = list(self._queue) + [s for s in self._active if s is not None]
            self._queue.clear()
            self._active = [None] * self.slots
        self.runner.state = None  # rebuilt at the next step
        for seq in seqs:
            self._finish(seq, "error", message)

    def step(self) -> bool:
        """One scheduling step (module docstring). Returns False when there was nothing to do."""
        self._admit()
        prefilling = [s for s in self._active if s is not None and s.plan]
        did = False
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda s: s.handle.id))
            did = True
        decoding = [s for s in self._active if s is not None and s.decoding]
        # Prompts that can be prefilled now (a queued request with no free slot cannot).
        waiting = any(s is not None and s.plan for s in self._active)
        if decoding and (self.interleave or not waiting):
            self._decode_chunk(decoding, self.stream_steps if self.interleave
                               else engine.DECODE_CHUNK)
            did = True
        return did

    # -- admission -----------------------------------------------------------------------------

    def _admit(self) -> None:
        now = time.perf_counter()
        ended = []
        with self._lock:
            for seq in list(self._queue):
                reason = seq.ending(now)
                if reason:
                    self._queue.remove(seq)
                    ended.append((seq, reason))
            for slot, seq in enumerate(self._active):
                reason = seq and seq.ending(now)
                if reason:
                    self._active[slot] = None
                    ended.append((seq, reason))
            admitted = []
            for slot in range(self.slots):
                if self._active[slot] is None and self._queue:
                    seq = self._queue.popleft()
                    seq.slot = slot
                    self._active[slot] = seq
                    admitted.append(seq)
        for seq, reason in ended:
            self._finish(seq, reason)
        for seq in admitted:
            if seq.max_new == 0:
                self._release(seq)
                self._finish(seq, "length")
            else:
                seq.plan = engine.prefill_plan(len(seq.prompt), self.context)

    def _release(self, seq: Sequence) -> None:
        with self._lock:
            if 0 <= seq.slot < self.slots and self._active[seq.slot] is seq:
                self._active[seq.slot] = None
            self._lock.notify_all()

    # -- device calls --------------------------------------------------------------------------

    def _call(self, fn, args: tuple, static: dict, seqs: list[Sequence]):
        result, elapsed, seconds = self.runner.call(fn, args, static)
        for seq in seqs:
            seq.handle.usage.compile_s += seconds
        return result, elapsed

    def _prefill_chunk(self, seq: Sequence) -> None:
        start, t = seq.plan.pop(0)
        n_valid = min(t, len(seq.prompt) - start)
        chunk = np.full((1, t), engine.PAD_ID, np.int32)
        chunk[0, :n_valid] = seq.prompt[start:start + n_valid]
        knobs = request_knobs([seq.sampling], [seq.max_new])
        eos = np.full((1, self.eos_width), -1, np.int32)
        eos[0, :len(seq.eos)] = seq.eos
        last = not seq.plan
        args = (self.params, self.runner.ensure_state(), *self.runner.put(
            (chunk, np.int32(seq.slot), np.int32(start), np.int32(n_valid), np.bool_(last),
             knobs, eos)))
        (self.runner.state, first), elapsed = self._call(engine.prefill, args, self.runner.static,
                                                         [seq])
        seq.handle.usage.prefill_s += elapsed
        if not last:
            return
        first, peek = self.runner.host((first, _peek(self.runner.state, seq.slot)))
        seq.handle.usage.first_token = time.perf_counter()
        if not peek["finite"]:
            self._fail_nonfinite(seq)
            return
        seq.decoding = True
        self._take(seq, [int(first["token"][0])], first, done=bool(peek["done"]),
                   full=bool(peek["length"] >= self.context))

    def _decode_chunk(self, seqs: list[Sequence], steps: int) -> None:
        want = max(s.max_new - s.text.produced for s in seqs)
        n_steps = max(1, min(steps, want))
        stop = np.ones(self.slots, bool)
        for s in seqs:
            stop[s.slot] = False
        logprobs = any(s.logprobs is not None for s in seqs)
        rows = engine.batch_bucket(max(s.slot for s in seqs) + 1)
        static = dict(self.runner.static, chunk=engine.DECODE_CHUNK, logprobs=logprobs, rows=rows)
        args = (self.params, self.runner.ensure_state(),
                *self.runner.put((np.int32(n_steps), stop)))
        (self.runner.state, out), elapsed = self._call(engine.decode, args, static, seqs)
        out, peek = self.runner.host((out, _peek(self.runner.state)))
        for seq in seqs:
            seq.handle.usage.decode_s += elapsed
            r = seq.slot
            if not peek["finite"][r]:
                self._fail_nonfinite(seq)
                continue
            tokens = [int(t) for t in out["tokens"][r] if t >= 0]
            self._take(seq, tokens, {k: v[r] for k, v in out.items()},
                       done=bool(peek["done"][r]),
                       full=bool(peek["length"][r] >= self.context))

    # -- host bookkeeping ----------------------------------------------------------------------

    def _take(self, seq: Sequence, tokens: list[int], lp: dict | None, *, done: bool,
              full: bool) -> None:
        if seq.take(tokens, lp, done=done, full=full):
            self._release(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self._release(seq)
        seq.finish(reason, error)

    def _fail_nonfinite(self, seq: Sequence) -> None:
        self._finish(seq, "error", (
            f"the model produced non-finite logits (NaN or inf) after {seq.text.produced} "
            f"generated tokens; the weights are corrupt or overflow in "
            f"{self.policy.compute_dtype}: check the checkpoint or try policy='cpu' (float32)."))

    # -- ahead of time -------------------------------------------------------------------------

    def warmup(self, *, prompt_lengths=None, logprobs: bool = True) -> float:
        """Compile now the programs requests will use; returns the seconds spent compiling.

        Args:
          prompt_lengths: prompt lengths (tokens) whose prefill chunks to compile (default:
            every chunk size a prompt up to the context can use).
          logprobs: also compile the decode program that returns top logprobs.
        """
        if prompt_lengths is None:
            prompt_lengths = [1 << n for n in range(self.context.bit_length())] + [self.context]
        return self.runner.warmup(prompt_lengths, logprobs)

    @property
    def compile_s(self) -> float:
        """Seconds this engine spent compiling programs."""
        return self.runner.compile_s


def _peek(state: dict, slot: int | None = None) -> dict:
    keys = ("done", "finite", "length")
    if slot is None:
        return {k: state[k] for k in keys}
    return {k: state[k][slot] for k in keys}

