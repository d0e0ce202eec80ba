"""What the routes share: the engine, the model's name, the server's limits and its phase.

Phases: loading (the engine is being built and warmed: /health and generation answer 503),
ready, draining (SIGTERM: in-flight requests finish, new ones get 503), failed.
"""

from __future__ import annotations

import dataclasses
import time

from bitnet_jax.runtime import engine as engine_lib
from bitnet_jax.server.errors import ApiError
from bitnet_jax.server.metrics import Metrics

MAX_BODY_BYTES = 16 << 20


@dataclasses.dataclass
class ServerState:
    """Shared by every route of one app.

    Attributes:
      model_name: the id /v1/models reports and requests must name (or leave out).
      tokenizer: the model's tokenizer (None: token-id prompts only).
      vocab_size: V, for checking token-id prompts.
      engine: the runtime Engine (None until built).
      timeout: per-request timeout in seconds (None: no limit).
      max_body: the largest request body accepted, in bytes.
    """

    model_name: str
    tokenizer: object
    vocab_size: int
    engine: object = None
    timeout: float | None = None
    max_body: int = MAX_BODY_BYTES
    phase: str = "loading"
    failure: str | None = None
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    metrics: Metrics = None

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = Metrics(self.engine_stats, lambda: dict(engine_lib.TRACES),
                                   lambda: self.phase == "ready")

    def engine_stats(self) -> dict | None:
        return self.engine.stats() if self.engine is not None else None

    def set_ready(self, engine) -> None:
        self.engine = engine
        if self.phase == "loading":
            self.phase = "ready"

    def check_ready(self) -> None:
        """ApiError 503 unless requests can be taken now."""
        if self.phase == "loading":
            raise ApiError(503, "the model is still loading and warming up; retry when GET "
                           "/health answers 200.", code="loading")
        if self.phase == "draining":
            raise ApiError(503, "the server is shutting down; retry on another replica or "
                           "after the restart.", code="shutting_down")
        if self.phase == "failed":
            raise ApiError(503, f"the server failed to start: {self.failure}",
                           code="startup_failed")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.model_name!r} (GET /v1/models).", param="model",
                           code="model_not_found")
