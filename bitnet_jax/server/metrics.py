"""`GET /metrics`: Prometheus text exposition through the official `prometheus_client`.

Each app has its own CollectorRegistry (two servers in one process do not share counters).

  bitnet_jax_requests_total{endpoint, status}     HTTP requests answered, by route and status
  bitnet_jax_finished_requests_total{finish_reason} engine requests (one per choice) by end
  bitnet_jax_prompt_tokens_total                   prompt tokens of submitted requests
  bitnet_jax_generated_tokens_total                tokens generated
  bitnet_jax_time_to_first_token_seconds           histogram: submit -> first token event
  bitnet_jax_inter_token_latency_seconds           histogram: per token, between events
  bitnet_jax_queue_depth, bitnet_jax_busy_slots, bitnet_jax_slots, bitnet_jax_ready   gauges
  bitnet_jax_program_traces_total{program}        JAX traces of the engine's jitted programs
                                                   (constant after warmup: no recompiles)

Tokens arrive in decode chunks, so the inter-token latency of a chunk of k tokens that came t
seconds after the previous one is recorded k times as t / k (vLLM's server does the same per
engine step).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    """The server's metrics.

    Args:
      engine_stats: returns {"slots", "busy_slots", "queue_depth"}, or None before the engine
        exists.
      traces: returns {program name: trace count}.
      ready: returns whether the server takes requests.
    """

    def __init__(self, engine_stats: Callable[[], dict | None],
                 traces: Callable[[], dict], ready: Callable[[], bool]):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("bitnet_jax_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=reg)
        self.finished = Counter("bitnet_jax_finished_requests",
                                "Engine requests (one per choice) by finish reason",
                                ["finish_reason"], registry=reg)
        self.prompt_tokens = Counter("bitnet_jax_prompt_tokens",
                                     "Prompt tokens of submitted requests", registry=reg)
        self.generated_tokens = Counter("bitnet_jax_generated_tokens", "Tokens generated",
                                        registry=reg)
        self.ttft = Histogram("bitnet_jax_time_to_first_token_seconds",
                              "Seconds from submission to the first token", registry=reg,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("bitnet_jax_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of a request", registry=reg,
                             buckets=LATENCY_BUCKETS)
        reg.register(_EngineCollector(engine_stats, traces, ready))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, handle) -> TokenTimer:
        return TokenTimer(self, handle)


class TokenTimer:
    """Records one engine request's token timings as its events arrive."""

    def __init__(self, metrics: Metrics, handle):
        self.metrics, self.handle = metrics, handle
        self.last: float | None = None
        self.done = False
        metrics.prompt_tokens.inc(handle.usage.prompt_tokens)

    def event(self, event) -> None:
        now = time.perf_counter()
        k = len(event.token_ids)
        if k:
            self.metrics.generated_tokens.inc(k)
            if self.last is None:
                self.metrics.ttft.observe(now - self.handle.usage.submitted)
                k -= 1
            elif k:
                for _ in range(k):
                    self.metrics.itl.observe((now - self.last) / k)
            self.last = now
        if event.finish_reason is not None:
            self.finish(event.finish_reason)

    def finish(self, reason: str) -> None:
        """Count the request's end once (the client may leave before its last event)."""
        if not self.done:
            self.done = True
            self.metrics.finished.labels(reason).inc()


class _EngineCollector:
    def __init__(self, engine_stats, traces, ready):
        self.engine_stats, self.traces, self.ready = engine_stats, traces, ready

    def collect(self):
        stats = self.engine_stats() or {"slots": 0, "busy_slots": 0, "queue_depth": 0}
        for name, key, text in (("bitnet_jax_queue_depth", "queue_depth", "Requests waiting "
                                 "for a slot"),
                                ("bitnet_jax_busy_slots", "busy_slots", "Decode slots in use"),
                                ("bitnet_jax_slots", "slots", "Decode slots")):
            yield GaugeMetricFamily(name, text, value=stats[key])
        yield GaugeMetricFamily("bitnet_jax_ready", "1 once the model is loaded and warm",
                                value=float(self.ready()))
        traces = CounterMetricFamily("bitnet_jax_program_traces",
                                     "JAX traces of the engine's jitted programs", labels=["program"])
        for program, count in sorted(self.traces().items()):
            traces.add_metric([program], count)
        yield traces


class MetricsMiddleware:
    """Pure ASGI middleware counting each HTTP response by endpoint and status."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.endpoints else "other"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
