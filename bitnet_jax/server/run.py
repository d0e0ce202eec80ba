"""Running the server: bind, warm the engine up in the background, serve, drain on SIGTERM.

  1. The socket is bound here first, so a busy port is one clear error instead of uvicorn's
     log lines, and `--port 0` picks a free port whose URL the ready line reports.
  2. The engine compiles its programs (Engine.warmup) in a background thread while uvicorn
     already answers: GET /health is 503 until it is warm, then 200, and one line `ready at
     URL` goes to stderr.
  3. The first SIGTERM or Ctrl-C drains: the server's phase becomes "draining" (new requests
     get 503, /health 503), `Engine.shutdown(drain=True, timeout=drain_timeout)` lets running
     and queued requests finish (past the timeout it cancels them: their streams end with an
     error event and [DONE]), then uvicorn stops accepting connections and gives the open ones
     `GRACE_S` to send their last bytes (uvicorn's timeout_graceful_shutdown). A second signal
     exits at once. Nothing waits without a bound.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import uvicorn

from bitnet_jax.errors import BitNetError
from bitnet_jax.runtime.scheduler import Engine
from bitnet_jax.server.app import create_app
from bitnet_jax.server.state import ServerState

GRACE_S = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; BitNetError naming the flag to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise BitNetError(f"--host {host} cannot be used ({exc.strerror or exc}); pass an IP "
                          "address or a resolvable name such as 127.0.0.1.") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BitNetError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                          "another --port (0 picks a free one) or --host.") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine before stopping."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's handler: it re-raises the signal after serving, which would end the
        # process by SIGTERM instead of with exit status 0.
        self.signals.append(sig)
        if len(self.signals) > 1:
            self.force_exit = self.should_exit = True
            return
        self.drain()

    def drain(self) -> None:
        """Stop taking requests, let the engine finish (bounded), then stop uvicorn."""
        if self.state.phase != "failed":
            self.state.phase = "draining"
        say(f"draining: finishing requests in flight (up to {self.drain_timeout:g} s); new "
            "requests get 503")

        def finish():
            engine = self.state.engine
            if engine is not None:
                engine.shutdown(drain=True, timeout=self.drain_timeout)
            self.should_exit = True

        threading.Thread(target=finish, name="bitnet-drain", daemon=True).start()


def serve(model, engine: Engine, *, name: str, sock: socket.socket, api_key: str | None,
          timeout: float | None, drain_timeout: float = 30.0, warmup: bool = True) -> int:
    """Serve `engine` on the bound socket until a signal; returns the exit status.

    Args:
      model: the loaded Model (tokenizer, config).
      engine: a built, not yet started Engine.
      name: the model id clients name (the file's stem or --alias).
      sock: from `bind`.
      api_key: required bearer key, or None.
      timeout: per-request timeout in seconds, or None.
      drain_timeout: seconds SIGTERM waits for requests in flight before cancelling them.
      warmup: compile every program before taking requests.
    """
    state = ServerState(name, model.tokenizer, model.config.vocab_size, timeout=timeout)
    config = uvicorn.Config(create_app(state, api_key), lifespan="off", log_level="warning",
                            access_log=False, timeout_graceful_shutdown=GRACE_S)
    server = Server(config, state, drain_timeout)
    url = url_of(sock)

    def warm():
        try:
            t0 = time.perf_counter()
            seconds = engine.warmup() if warmup else 0.0
            engine.start()
        except Exception as exc:  # noqa: BLE001 - report it as the server's failure, then stop
            state.phase, state.failure = "failed", f"{type(exc).__name__}: {exc}"
            say(f"error: the engine failed to warm up: {state.failure}")
            server.should_exit = True
            return
        state.set_ready(engine)
        say(f"ready at {url} (model {name}, {engine.slots} slots, context {engine.context}, "
            f"warmup {time.perf_counter() - t0:.1f} s, compile {seconds:.1f} s)")

    say(f"listening on {url}; warming up (GET /health answers 503 until ready)")
    warmer = threading.Thread(target=warm, name="bitnet-warmup", daemon=True)
    warmer.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(drain=False, timeout=GRACE_S)
        sock.close()
    code = 1 if state.phase == "failed" else \
        130 if server.signals and server.signals[0] == signal.SIGINT else 0
    if warmer.is_alive():
        # Stopped while XLA still compiles in the warm-up thread: the interpreter's teardown
        # would abort inside it, so leave without it (as cli/main.py does for Ctrl-C).
        say("stopped during warm-up")
        sys.stdout.flush()
        os._exit(code)
    return code


def say(text: str) -> None:
    try:
        print(f"bitnet-jax serve: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
