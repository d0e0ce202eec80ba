"""The OpenAI-compatible HTTP API: routes, request reading, error handlers, the app factory.

Stack: Starlette (ASGI) + pydantic + uvicorn. Starlette is small and well kept (it is what
FastAPI is built on) and lets the streaming response be a plain ASGI callable that listens for
the client's disconnect itself (sse.py); FastAPI's extras (OpenAPI pages, dependency injection,
422 validation bodies) would all have to be overridden to answer in OpenAI's error shape.
pydantic validates the bodies (schemas.py); uvicorn is the reference ASGI server (run.py).

  POST /v1/completions        prompt (string, token ids, or a batch of either) -> text
  POST /v1/chat/completions   messages through the model's chat template -> assistant text
  GET  /v1/models             the one model served
  GET  /health                200 {"status": "ok"} once loaded and warm, else 503
  GET  /metrics               Prometheus text (metrics.py)

Every error is OpenAI's JSON error shape (errors.py) with its status: 400 malformed JSON or a
bad field (named), 401 wrong key, 404 unknown model or route, 405, 413 body too large, 429
queue full, 503 loading or shutting down, 500/504 for a request the engine failed or timed out.
"""

from __future__ import annotations

import json
import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bitnet_jax.errors import BitNetError
from bitnet_jax.runtime.request import encode_prompt
from bitnet_jax.server import jobs, responses, schemas
from bitnet_jax.server.auth import ApiKeyMiddleware
from bitnet_jax.server.errors import ApiError
from bitnet_jax.server.metrics import CONTENT_TYPE, MetricsMiddleware
from bitnet_jax.server.state import ServerState

log = logging.getLogger("bitnet_jax.server")
ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


def create_app(state: ServerState, api_key: str | None = None):
    """The ASGI app serving `state` (its engine may still be warming up: 503 until ready).

    Args:
      state: the ServerState the routes share.
      api_key: require `Authorization: Bearer <api_key>` on every route but /health.
    """

    async def completions(request: Request):
        req = schemas.parse(schemas.CompletionRequest, await read_json(request, state.max_body))
        state.check_model(req.model)
        state.check_ready()
        prompts = await run_in_threadpool(
            lambda: [encode(state, p, "prompt") for p in req.prompts()])
        job = jobs.submit(state, req, prompts, "completion", req.logprobs, req.max_tokens,
                          "prompt")
        return _respond(await jobs.answer(state, request, job, state.model_name, req.stream))

    async def chat_completions(request: Request):
        req = schemas.parse(schemas.ChatCompletionRequest,
                            await read_json(request, state.max_body))
        state.check_model(req.model)
        state.check_ready()
        if state.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so chat messages cannot be "
                           "encoded; use /v1/completions with token ids.", param="messages")
        conversation = req.conversation()
        prompt = await run_in_threadpool(encode, state, conversation, "messages")
        job = jobs.submit(state, req, [prompt], "chat", req.top_logprobs_count(), req.max_new(),
                          "messages")
        return _respond(await jobs.answer(state, request, job, state.model_name, req.stream))

    async def models(request: Request):
        engine = state.engine
        return JSONResponse(responses.models_list(
            state.model_name, state.created, engine.context if engine else 0,
            engine.slots if engine else 0))

    async def health(request: Request):
        if state.phase == "ready":
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": state.phase, "error": state.failure}, status_code=503)

    async def metrics(request: Request):
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.server = state
    return MetricsMiddleware(ApiKeyMiddleware(app, api_key), state.metrics, ENDPOINTS)


def encode(state: ServerState, prompt, param: str) -> list[int]:
    """Token ids of a text prompt, token-id list or conversation; ApiError 400 when it cannot
    be encoded."""
    try:
        return encode_prompt(prompt, state.tokenizer)
    except BitNetError as exc:
        raise ApiError(400, str(exc), param=param) from None


async def read_json(request: Request, limit: int):
    """The decoded JSON body; ApiError 413 past `limit` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise _too_large(len(data), limit)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the body.") from None
    if not data:
        raise ApiError(400, "the request has no body; send a JSON object.")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc}); send a JSON object.") \
            from None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body has {size} bytes, more than the server's limit of "
                    f"{limit}; send a shorter prompt.", code="request_too_large")


def _respond(result):
    if result is None:  # the client went away before the answer was ready
        return Response(status_code=499)
    if isinstance(result, dict):
        return JSONResponse(result)
    return result


async def _api_error(request: Request, exc: ApiError):
    return exc.response()


async def _http_error(request: Request, exc: HTTPException):
    if exc.status_code == 404:
        message = f"no route {request.url.path}; the API is under /v1 (GET /v1/models)."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}."
    else:
        message = str(exc.detail)
    return ApiError(exc.status_code, message).response()


async def _internal_error(request: Request, exc: Exception):
    log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc,
              exc_info=exc)
    return ApiError(500, f"internal server error ({type(exc).__name__}); see the server log.",
                    code="internal_error").response()
