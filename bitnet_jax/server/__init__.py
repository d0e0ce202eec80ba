"""`bitnet-jax serve`: an OpenAI-compatible HTTP server on the runtime's Engine ([serve] extra).

  app.py        routes and the app factory (create_app); why Starlette + pydantic + uvicorn
  schemas.py    request bodies and their validation
  jobs.py       one HTTP request as engine requests: submit, stream, collect
  responses.py  OpenAI's response and chunk shapes
  sse.py        server-sent events and client-disconnect detection
  errors.py     OpenAI's error shape (ApiError)
  auth.py       the --api-key bearer check
  metrics.py    Prometheus /metrics
  state.py      what the routes share (engine, phase, limits)
  run.py        bind, warm up, serve with uvicorn, drain on SIGTERM

Imports the runtime, formats and errors rooms; only the CLI imports it. Its third-party
dependencies (starlette, pydantic, uvicorn, prometheus_client) come with
`pip install "bitnet-jax[serve]"`.
"""

from __future__ import annotations

from bitnet_jax.server.app import create_app
from bitnet_jax.server.state import ServerState

__all__ = ["ServerState", "create_app"]
