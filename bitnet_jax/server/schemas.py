"""Request bodies of the OpenAI endpoints, validated with pydantic, and their refusals.

`parse(Model, body)` turns a decoded JSON object into a request model or raises ApiError 400
naming the field (its dotted path, e.g. `messages.0.content`). Models are strict (a string is
not a number, `true` is not an integer) and ignore unknown fields, as OpenAI-compatible servers
(llama-server, vLLM) do, so clients that send newer OpenAI fields keep working.

Fields follow OpenAI's API reference for /v1/completions and /v1/chat/completions. Extensions,
sent as extra body fields (`extra_body=` in the openai client): `top_k`, `min_p`,
`repeat_penalty` (alias `repetition_penalty`), `ignore_eos` (do not stop at EOS; benchmarks) and
`truncate` (keep a too-long prompt's last tokens instead of refusing it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from bitnet_jax.server.errors import ApiError

MAX_N = 128  # OpenAI's upper bound for n
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's bound; the engine's TOP_LOGPROBS


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None
    # Extensions (llama.cpp's names).
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, validation_alias=AliasChoices(
        "repeat_penalty", "repetition_penalty"))
    ignore_eos: bool = False
    truncate: bool = False

    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stops) > MAX_STOP:
            raise ApiError(400, f"'stop' has {len(stops)} strings; give at most {MAX_STOP}.",
                           param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "'stop' holds an empty string; give non-empty stop strings.",
                           param="stop")
        return stops

    def check_unsupported(self) -> None:
        """Refuse OpenAI fields this server does not implement, rather than ignore them."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise ApiError(400, f"'{name}' is not supported; use the 'repeat_penalty' "
                               "extension (> 1 discourages repeats) instead.", param=name)
        if self.logit_bias:
            raise ApiError(400, "'logit_bias' is not supported; leave it out.",
                           param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise ApiError(400, "'echo' is not supported; leave it out or set it to false.",
                           param="echo")
        if self.suffix:
            raise ApiError(400, "'suffix' (insertion) is not supported; leave it out.",
                           param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "'best_of' is not supported beyond best_of == n; leave it out.",
                           param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string, one token-id list, or a batch of either (one choice set
        each)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ApiError(400, "'prompt' is empty; give a string, a list of token ids, or a "
                           "list of those.", param="prompt")
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise ApiError(400, "'tools' (function calling) is not supported; leave it out.",
                           param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ApiError(400, "only 'response_format' {\"type\": \"text\"} is supported.",
                           param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")

    def conversation(self) -> list[dict]:
        """[{"role", "content"}] for the chat template ("developer" is OpenAI's new "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]

    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """The engine's logprobs argument: None (off) or how many alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


def parse(model: type[_Body], body: object) -> _Body:
    """Validate a decoded JSON body; ApiError 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not "
                       f"{type(body).__name__}.")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or None
        got = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.60})"
        raise ApiError(400, f"invalid '{param}': {err['msg']}{got}.", param=param) from None
    req.check_unsupported()
    return req


def _is_type_tag(part) -> bool:
    # Union members appear in error locations as type names ("str", "list[int]").
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict")
                                      or part.startswith(("list[", "function-")))
