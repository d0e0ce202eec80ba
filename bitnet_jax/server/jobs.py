"""One generation request on the engine: submit its choices, then stream or collect them.

A request with P prompts and `n` choices becomes P*n engine requests (choice index
prompt_index * n + j, as OpenAI numbers them), each with seed seed + j so the choices differ
and a given seed reproduces them. Finished events are turned into OpenAI's JSON by
responses.py; an engine request that ends without an answer (a non-finite logit, the per-request
timeout, shutdown) fails the whole HTTP request with errors.finish_error, alone: the engine's
other requests go on. Whatever way a request ends, its still-running choices are cancelled, so
their slots free at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets

from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime.handle import Handle
from bitnet_jax.runtime.sampling import SamplingParams
from bitnet_jax.runtime.scheduler import QueueFull
from bitnet_jax.server import responses
from bitnet_jax.server.errors import ApiError, finish_error
from bitnet_jax.server.sse import DONE, EventStream, until_disconnect

# SamplingParams field -> request field, for naming the field in a refusal.
FIELD_NAMES = {"repetition_penalty": "repeat_penalty"}


@dataclasses.dataclass
class Choice:
    index: int
    prompt_index: int
    handle: Handle
    timer: object
    text: str = ""
    logprobs: list = dataclasses.field(default_factory=list)
    sent: int = 0  # characters already streamed (completions' text_offset)


@dataclasses.dataclass
class Job:
    """The engine requests of one HTTP request.

    Attributes:
      kind: "completion" or "chat".
      choices: one per engine request, in index order.
      prompt_tokens: prompt tokens, each prompt counted once (not once per choice).
    """

    kind: str
    rid: str
    choices: list[Choice]
    prompt_tokens: int
    want_logprobs: bool
    include_usage: bool

    def cancel(self) -> None:
        for c in self.choices:
            if not c.handle.finished:
                c.handle.cancel()

    def usage(self) -> dict:
        return responses.usage(self.prompt_tokens,
                               sum(c.handle.usage.completion_tokens for c in self.choices))


def submit(state, req, prompts: list[list[int]], kind: str, logprobs: int | None,
           max_new: int | None, param: str) -> Job:
    """Check the prompts against the context, then queue every choice on the engine.

    Args:
      state: the ServerState.
      req: the validated request (schemas.py).
      prompts: token ids of each prompt.
      kind: "completion" or "chat".
      logprobs: None, or how many top alternatives per token.
      max_new: the request's max_tokens (None: what fits the context).
      param: the request field holding the prompt ("prompt" or "messages"), for refusals.
    """
    engine = state.engine
    ctx = engine.context
    planned = []
    for i, ids in enumerate(prompts):
        bad = next((t for t in ids if not 0 <= t < state.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"'{param}' holds token id {bad}, outside the model's vocabulary "
                           f"[0, {state.vocab_size}).", param=param)
        if not ids:
            raise ApiError(400, "the prompt is empty after encoding; give at least one token.",
                           param=param)
        reserve = max_new if max_new is not None else ctx // 2  # room to generate
        if req.truncate and len(ids) + reserve > ctx:
            # The same rule as runtime/request.py: room for max_new, but at least half the context.
            ids = ids[-max(ctx - reserve, ctx // 2, 1):]
        if len(ids) > ctx:
            raise ApiError(400, f"the prompt has {len(ids)} tokens but the server's context holds "
                           f"{ctx}; shorten it, or send \"truncate\": true to keep its last "
                           "tokens.", param=param, code="context_length_exceeded")
        planned.append((i, ids, ctx - len(ids) if max_new is None else max_new))
    stops = req.stops()
    base = req.seed if req.seed is not None else secrets.randbits(32)
    try:
        samplings = [SamplingParams(temperature=req.temperature, top_k=req.top_k,
                                    top_p=req.top_p, min_p=req.min_p,
                                    repetition_penalty=req.repeat_penalty,
                                    seed=(base + j) % 2**32) for j in range(req.n)]
    except GenerationError as exc:
        raise ApiError(400, str(exc), param=_field_of(str(exc))) from None
    choices: list[Choice] = []
    try:
        for i, ids, m in planned:
            for j, sampling in enumerate(samplings):
                handle = engine.submit(ids, max_new_tokens=m, sampling=sampling,
                                       stop=stops, ignore_eos=req.ignore_eos,
                                       logprobs=logprobs, timeout=state.timeout)
                choices.append(Choice(i * req.n + j, i, handle, state.metrics.timer(handle)))
    except QueueFull as exc:
        _abandon(choices)
        if state.phase == "draining":
            raise ApiError(503, str(exc), code="shutting_down") from None
        total = len(planned) * req.n
        fitted = f" ({len(choices)} of the request's {total} choices fitted)" if total > 1 else ""
        raise ApiError(429, f"{exc}{fitted}", code="queue_full") from None
    except GenerationError as exc:
        _abandon(choices)
        raise ApiError(400, str(exc), param=param) from None
    return Job(kind, responses.new_id("cmpl" if kind == "completion" else "chatcmpl"), choices,
               sum(len(ids) for _, ids, _ in planned), logprobs is not None,
               req.include_usage)


def _abandon(choices: list[Choice]) -> None:
    for c in choices:
        c.handle.cancel()
        c.timer.finish("cancelled")


def _field_of(message: str) -> str | None:
    for word in message.replace("=", " ").split():
        if word in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
            return FIELD_NAMES.get(word, word)
    return None


# ------------------------------------------------------------------------------------------------
# Answering


async def answer(state, request, job: Job, model: str, stream: bool):
    """The ASGI response: an EventStream, or the whole JSON body once every choice finished."""
    if stream:
        return EventStream(_events(state, job, model), job.cancel)
    body = await until_disconnect(request.receive, _collect(state, job, model), job.cancel)
    return body


async def _merged(job: Job):
    """(choice, event) as they arrive from every choice, until all have finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice):
        try:
            async for event in choice.handle:
                await queue.put((choice, event))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.ensure_future(pump(c)) for c in job.choices]
    try:
        remaining = len(tasks)
        while remaining:
            choice, event = await queue.get()
            if event is None:
                remaining -= 1
                continue
            choice.timer.event(event)
            yield choice, event
    finally:
        job.cancel()
        for t in tasks:
            t.cancel()
        for c in job.choices:  # the ones the client left before they ended
            c.timer.finish("cancelled")


async def _collect(state, job: Job, model: str) -> dict:
    async with contextlib.aclosing(_merged(job)) as events:
        async for choice, event in events:
            choice.text += event.text
            if event.logprobs:
                choice.logprobs.extend(event.logprobs)
            if event.finish_reason in ("error", "timeout", "cancelled"):
                raise finish_error(event.finish_reason, event.error, state.timeout)
    tok = state.tokenizer
    out = []
    for c in job.choices:
        lp = None
        if job.want_logprobs:
            lp = (responses.completion_logprobs(tok, c.logprobs) if job.kind == "completion"
                  else responses.chat_logprobs(tok, c.logprobs))
        out.append({"index": c.index, "text": c.text, "logprobs": lp,
                    "finish_reason": responses.finish_reason(c.handle.finish_reason)})
    build = responses.completion if job.kind == "completion" else responses.chat_completion
    return build(job.rid, model, out, job.usage())


async def _events(state, job: Job, model: str):
    """The server-sent events of a streamed request, ending with [DONE]."""
    tok, chat = state.tokenizer, job.kind == "chat"
    if chat:
        for c in job.choices:
            yield responses.chat_chunk(job.rid, model, c.index, {"role": "assistant",
                                                                 "content": ""},
                                       None, None, job.include_usage)
    async with contextlib.aclosing(_merged(job)) as events:
        async for choice, event in events:
            if event.finish_reason in ("error", "timeout", "cancelled"):
                yield finish_error(event.finish_reason, event.error, state.timeout).body()
                yield DONE
                return
            finish = responses.finish_reason(event.finish_reason)
            lp = None
            if job.want_logprobs and event.logprobs:
                lp = (responses.chat_logprobs(tok, event.logprobs) if chat else
                      responses.completion_logprobs(tok, event.logprobs, choice.sent))
            choice.sent += len(event.text)
            if chat:
                if event.text or lp:
                    yield responses.chat_chunk(job.rid, model, choice.index,
                                               {"content": event.text}, lp, None,
                                               job.include_usage)
                if finish is not None:
                    yield responses.chat_chunk(job.rid, model, choice.index, {}, None, finish,
                                               job.include_usage)
            elif event.text or lp or finish is not None:
                yield responses.completion_chunk(job.rid, model, choice.index, event.text, lp,
                                                 finish, job.include_usage)
    if job.include_usage:
        yield responses.usage_chunk(job.rid, model, "chat.completion.chunk" if chat else
                                    "text_completion", job.usage())
    yield DONE
