"""Chat prompts: the model's Jinja template, rendered as HF transformers does, or BitNet's format.

HF renders `chat_template` in a sandboxed Jinja environment (trim_blocks, lstrip_blocks,
loopcontrols) with `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text,
passing `messages`, `add_generation_prompt` and the special-token strings. Without a template
we use BitNet-2B4T's trained format (microsoft/BitNet gpu/tokenizer.py `ChatFormat`; spec §3):
`<|begin_of_text|>` then `Role: content<|eot_id|>` per message and `Assistant: ` to answer.

The functions take the tokenizer as an argument and use only its public surface (`chat_template`,
the special ids, `piece_to_id`, `id_to_bytes`), so this module imports no other tokenizer module.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer._decode import check_utf8

_ROLES = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
# microsoft/BitNet's GGUF converter stores a placeholder template ("Human: ... BITNETAssistant:")
# that the model was not trained on; treat it as no template.
_BITNET_PLACEHOLDER = "BITNETAssistant"


def apply_chat_template(tok: Any, messages: Sequence[Mapping[str, Any]],
                        add_generation_prompt: bool) -> str:
    """See `Tokenizer.apply_chat_template`; `tok` is the Tokenizer."""
    messages = _check_messages(messages)
    template = tok.chat_template
    if not template or _BITNET_PLACEHOLDER in template:
        return _bitnet_format(tok, messages, add_generation_prompt)
    from jinja2 import TemplateError

    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "unk_token": tok.unk_id,
             "pad_token": tok.pad_id}
    specials = {k: _text(tok, v) for k, v in names.items() if v is not None}
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **specials
        )
    except TemplateError as e:
        raise TokenizerError(f"the chat template failed on these messages: {e}.") from None


def _bitnet_format(tok: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    begin = "<|begin_of_text|>" if tok.piece_to_id("<|begin_of_text|>") is not None else ""
    if tok.piece_to_id("<|eot_id|>") is not None:
        end = "<|eot_id|>"
    else:
        end = _text(tok, tok.eos_id) if tok.eos_id is not None else ""
    parts = [begin]
    for m in messages:
        if m["role"] not in _ROLES:
            raise TokenizerError(
                f"message role {m['role']!r} is not system, user or assistant, the only roles "
                "BitNet's chat format has."
            )
        parts.append(_ROLES[m["role"]] + str(m["content"]).strip() + end)
    if add_generation_prompt:
        parts.append(_ROLES["assistant"])
    return "".join(parts)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} dicts.")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TokenizerError(f"chat message {m!r} needs 'role' and 'content' keys.")
        for key in ("role", "content"):
            if isinstance(m[key], str):
                check_utf8(m[key], f"the {key} of chat message {n}")
        out.append(dict(m))
    return out


def _text(tok: Any, token_id: int) -> str:
    return tok.id_to_bytes(token_id).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise TokenizerError(f"the model's chat template is not valid Jinja: {e}.") from None


def _raise(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)
