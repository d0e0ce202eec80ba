"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Every refusal the server makes is an `ApiError` raised inside a handler and turned into this
body with its HTTP status by the app's exception handler (app.py), so a user error is never a
500. The `type` strings follow OpenAI's API reference (invalid_request_error,
authentication_error, ...); `code` is a short machine-readable word or None.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """One refused or failed request: the HTTP status and OpenAI's error fields.

    Args:
      status: HTTP status code.
      message: one sentence naming the problem and the fix.
      param: the request field at fault, or None.
      code: a short machine-readable code (e.g. "model_not_found"), or None.
      type: OpenAI's error type; default from the status.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status in (429, 503):
            headers = {"Retry-After": "1"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def finish_error(finish_reason: str, message: str | None, timeout: float | None) -> ApiError:
    """The ApiError for a request the engine ended without an answer (error/timeout/cancelled).

    Args:
      finish_reason: the engine's reason: "error", "timeout" or "cancelled".
      message: the engine's error message (finish_reason "error").
      timeout: the server's per-request timeout in seconds (for the message).
    """
    if finish_reason == "timeout":
        return ApiError(504, f"the request ran longer than the server's per-request timeout "
                        f"({timeout:g} s); ask for fewer tokens or retry later.", code="timeout")
    if finish_reason == "cancelled":
        return ApiError(503, "the server is shutting down and cancelled this request; retry on "
                        "another replica or after the restart.", code="shutting_down")
    return ApiError(500, message or "the engine failed on this request.", code="generation_error")
