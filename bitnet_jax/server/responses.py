"""The JSON bodies the endpoints answer with, in OpenAI's shapes (API reference, 2025).

  completion(...)        /v1/completions          object "text_completion"
  chat_completion(...)   /v1/chat/completions     object "chat.completion"
  completion_chunk / chat_chunk / usage_chunk    the same as server-sent event chunks
                                                   (object "text_completion" /
                                                   "chat.completion.chunk")

Logprobs: completions use the legacy layout ({"tokens", "token_logprobs", "top_logprobs":
[{token: logprob}], "text_offset"}); chat uses {"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}]}]}. Token strings are each token's own text
(`Tokenizer.token_to_piece`), bytes its raw bytes.

The engine's finish reasons map onto OpenAI's: "context_full" (the KV cache is full) reads as
"length", as llama-server reports it.
"""

from __future__ import annotations

import time
import uuid

FINISH = {"stop": "stop", "length": "length", "context_full": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _piece(tok, token_id: int) -> str:
    return tok.token_to_piece(token_id) if tok is not None else ""


def completion_logprobs(tok, lps, offset: int = 0) -> dict:
    """Legacy completions logprobs for a run of TokenLogprobs; `offset` is the text length
    already sent before them (text_offset counts from the start of the completion)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        text = _piece(tok, lp.token_id)
        tokens.append(text)
        token_lps.append(lp.logprob)
        tops.append({_piece(tok, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tok, lps) -> dict:
    """Chat logprobs ({"content": [...], "refusal": None}) for a run of TokenLogprobs."""

    def entry(token_id, logprob):
        data = tok.id_to_bytes(token_id) if tok is not None else b""
        return {"token": _piece(tok, token_id), "logprob": logprob, "bytes": list(data)}

    return {"content": [dict(entry(lp.token_id, lp.logprob),
                             top_logprobs=[entry(t, v) for t, v in lp.top]) for lp in lps],
            "refusal": None}


def completion(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    """choices: [{"index", "text", "logprobs", "finish_reason"}]."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def chat_completion(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    """choices: [{"index", "text", "logprobs", "finish_reason"}] -> chat message choices."""
    out = [{"index": c["index"],
            "message": {"role": "assistant", "content": c["text"], "refusal": None},
            "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]} for c in choices]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": out, "usage": use, "system_fingerprint": None}


def completion_chunk(rid: str, model: str, index: int, text: str, logprobs: dict | None,
                     finish: str | None, with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
             "model": model, "system_fingerprint": None,
             "choices": [{"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def chat_chunk(rid: str, model: str, index: int, delta: dict, logprobs: dict | None,
               finish: str | None, with_usage: bool) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "system_fingerprint": None,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": [], "usage": use}


def models_list(name: str, created: int, context: int, slots: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "bitnet-jax",
                                        "meta": {"context": context, "slots": slots}}]}
