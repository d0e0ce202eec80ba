"""What a caller holds for one submitted request: `Handle`, and the `Event`s it yields.

The engine thread (scheduler.py) pushes events; the caller reads them synchronously
(`for event in handle`, `handle.wait()`) or from asyncio (`async for event in handle`), which is
how the HTTP server consumes them without a thread per stream. `cancel()` may be called from any
thread; the engine frees the request's slot at its next step (within one decode chunk).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque

FINISH_REASONS = ("stop", "length", "context_full", "cancelled", "timeout", "error")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its logprob and, when asked, the most likely alternatives.

    Attributes:
      token_id: the token.
      logprob: its log-probability under the model's raw distribution (engine.py).
      top: [(token_id, logprob)] most likely first; empty unless top logprobs were requested.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Event:
    """A piece of one request's output.

    Attributes:
      text: new text (may be empty: a token can end inside a UTF-8 character or a possible
        stop string).
      token_ids: the new generated token ids (EOS excluded).
      logprobs: one TokenLogprob per new token when the request asked for logprobs, else None.
      finish_reason: None while running; at the end one of FINISH_REASONS.
      error: the message when finish_reason is "error".
    """

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclasses.dataclass
class Usage:
    """Token counts and times of one finished request (seconds; perf_counter clock)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    submitted: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0


class Handle:
    """The consumer side of one request (thread-safe)."""

    def __init__(self, request_id: int, prompt_tokens: int):
        self.id = request_id
        self.usage = Usage(prompt_tokens=prompt_tokens, submitted=time.perf_counter())
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self._cancelled = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- engine side ---------------------------------------------------------------------------

    def push(self, event: Event) -> None:
        with self._cond:
            self.text += event.text
            self.token_ids.extend(event.token_ids)
            if event.finish_reason is not None:
                self.finish_reason, self.error = event.finish_reason, event.error
                self.usage.finished = time.perf_counter()
            self._events.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # -- caller side ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to stop this request; it ends with finish_reason "cancelled"."""
        self._cancelled = True

    def poll(self) -> Event | None:
        """The next event if one is ready, else None."""
        with self._cond:
            return self._events.popleft() if self._events else None

    def next_event(self, timeout: float | None = None) -> Event | None:
        """Block until the next event (None after `timeout` seconds or once all were read)."""
        with self._cond:
            if not self._events and not self._drained():
                self._cond.wait(timeout)
            return self._events.popleft() if self._events else None

    def _drained(self) -> bool:
        return self.finish_reason is not None and not self._events

    def __iter__(self):
        while True:
            event = self.next_event()
            if event is None:
                if self._drained():
                    return
                continue
            yield event
            if event.finish_reason is not None:
                return

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, flag))
        try:
            while True:
                event = self.poll()
                if event is None:
                    if self._drained():
                        return
                    await flag.wait()
                    flag.clear()
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            with self._cond:
                self._waiters.remove((loop, flag))
