"""API-key check (`--api-key`): OpenAI's `Authorization: Bearer KEY` header.

A pure ASGI middleware in front of every route except the public ones (GET /health, so that
load balancers can probe without the key). The key is compared with `hmac.compare_digest`,
whose time does not depend on where the first differing byte is (only on the lengths).
"""

from __future__ import annotations

import hmac

from bitnet_jax.server.errors import ApiError


class ApiKeyMiddleware:
    """Refuse requests without the right bearer key with 401 in OpenAI's error shape.

    Args:
      app: the ASGI app behind it.
      key: the API key; None lets every request through.
      public: paths that need no key.
    """

    def __init__(self, app, key: str | None, public: frozenset[str] = frozenset({"/health"})):
        self.app = app
        self.key = key.encode() if key else None
        self.public = public

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and \
                scope.get("path") not in self.public:
            error = self.check(dict(scope.get("headers") or ()).get(b"authorization"))
            if error is not None:
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)

    def check(self, header: bytes | None) -> ApiError | None:
        """None when the Authorization header carries the key, else the 401 to answer."""
        if not header:
            return ApiError(401, "missing API key; send it as the header `Authorization: "
                            "Bearer KEY` (the openai client's api_key).", code="invalid_api_key")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
            return ApiError(401, "invalid API key; use the key the server was started with "
                            "(--api-key or BITNET_JAX_API_KEY).", code="invalid_api_key")
        return None
