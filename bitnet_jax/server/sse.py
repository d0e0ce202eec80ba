"""Server-sent events, and noticing a client that went away.

`EventStream` is a raw ASGI response (the WHATWG server-sent events format: `data: <json>` and
a blank line per event, ending with OpenAI's `data: [DONE]`). While it streams it also listens
on the ASGI `receive` channel: when the server reports `http.disconnect` it calls
`on_disconnect` (which cancels the engine requests, so their slots free at the next engine
step) and stops. Starlette's StreamingResponse only watches for a disconnect under ASGI spec
< 2.4 and otherwise learns of it at the next failed write, and uvicorn drops writes to a closed
connection silently; listening ourselves frees the slot even while the request still waits in
the queue.

`until_disconnect` does the same for a non-streaming answer that is still being generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

DONE = "[DONE]"
HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
           (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def encode(item: dict | str) -> bytes:
    """One event: a dict as JSON, or the literal [DONE]."""
    data = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False,
                                                          separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def wait_disconnect(receive) -> None:
    """Return once the ASGI server reports that the client disconnected."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive, work: Awaitable, on_disconnect: Callable[[], None]):
    """Await `work`; if the client disconnects first, call `on_disconnect`, cancel `work` and
    return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        on_disconnect()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        watcher.cancel()
        task.cancel()


class EventStream:
    """An ASGI response streaming `events` (dicts or DONE) as server-sent events.

    Args:
      events: an async iterator of events; it is closed when the stream ends either way.
      on_disconnect: called once if the client disconnects before the stream ends.
    """

    def __init__(self, events: AsyncIterator[dict | str], on_disconnect: Callable[[], None]):
        self.events = events
        self.on_disconnect = on_disconnect
        self.disconnected = False

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        sender = asyncio.ensure_future(self._send_all(send))
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if sender not in done:
                self._gone()
                sender.cancel()
            try:
                await sender
            except asyncio.CancelledError:
                pass
            except OSError:  # a server that raises on writes to a closed connection
                self._gone()
        finally:
            watcher.cancel()
            sender.cancel()
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
        if not self.disconnected:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _gone(self) -> None:
        if not self.disconnected:
            self.disconnected = True
            self.on_disconnect()

    async def _send_all(self, send) -> None:
        async for item in self.events:
            await send({"type": "http.response.body", "body": encode(item), "more_body": True})
