"""Request preparation: prompts to validated token ids, per-prompt settings, EOS ids, placement.

Prompts (text, chat conversations or token ids) become token ids, which are validated against
the vocabulary and the context length. Errors name the option to change in the Python API's
words and, as `cli_message`, in the command line's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime.placement import resolve_device, resolve_policy
from bitnet_jax.runtime.sampling import SamplingParams, knob_arrays


@dataclasses.dataclass
class Request:
    model: object
    prompts: list[list[int]]
    max_new: list[int]
    sampling: list[SamplingParams]
    stops: tuple[str, ...]
    ignore_eos: bool
    device: object
    policy: object

    @classmethod
    def build(cls, model, prompts, max_new_tokens, sampling, sampling_kwargs, backend="auto",
              stop=None, chat=False, system=None, truncate=False, policy=None, ignore_eos=False):
        items = _prompt_list(prompts)
        n = len(items)
        max_new = _per_prompt(max_new_tokens, n, "max_new_tokens")
        for m in max_new:
            if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m < 0:
                raise GenerationError(f"max_new_tokens={m!r} must be an integer >= 0.")
        if sampling is None:
            sampling = SamplingParams()
        sampling = [dataclasses.replace(s, **sampling_kwargs) if sampling_kwargs else s
                    for s in _per_prompt(sampling, n, "sampling")]
        tok = model.tokenizer
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) or not s for s in stops):
            raise GenerationError("stop strings must be non-empty strings.")
        if stops and tok is None:
            raise GenerationError("stop strings need a tokenizer; this model has none.")
        if system is not None and not chat:
            raise GenerationError("system= only applies to chat prompts; pass chat=True too.",
                                  cli_message="--system only applies with --chat.")
        cfg = model.config
        ids = [_validate(encode_prompt(item, tok, chat, system), i, cfg, max_new[i], truncate)
               for i, item in enumerate(items)]
        device = resolve_device(backend)
        policy = resolve_policy(device, policy, model.policy)
        return cls(model, ids, [int(m) for m in max_new], sampling, stops, bool(ignore_eos),
                   device, policy)


def sampling_kwargs(kwargs: dict) -> dict:
    """Split SamplingParams fields out of `kwargs` (in place) for stream()."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def one_prompt(prompt):
    if isinstance(prompt, np.ndarray):
        prompt = prompt.tolist()
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], (list, tuple, str)):
        raise GenerationError("stream() takes one prompt; use generate() for several.")
    return [prompt]


def _prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    if not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError("prompts must be a str, a list of token ids, a conversation, or "
                              "a non-empty list of those.")
    if isinstance(prompts[0], (int, np.integer, dict)):
        return [list(prompts)]  # one token-id prompt or one conversation
    return list(prompts)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise GenerationError(f"{name} has {len(value)} entries for {n} prompts.")
        return list(value)
    return [value] * n


def encode_prompt(item, tok, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of one prompt (text, conversation or ids) exactly as generate() encodes it."""
    is_conversation = isinstance(item, (list, tuple)) and item and isinstance(item[0], dict)
    if isinstance(item, str) or is_conversation:
        if tok is None:
            raise GenerationError("this model has no tokenizer, so text prompts cannot be "
                                  "encoded; pass token ids or load a model with tokenizer files.")
        if not (chat or is_conversation):
            return list(tok.encode(item, add_special=True))
        messages = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
        if system is not None and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}] + messages
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        return list(tok.encode(text, add_special=False, parse_special=True))
    if chat:
        raise GenerationError("chat=True needs text prompts or conversations, not token ids.")
    try:
        return [int(t) for t in item]
    except (TypeError, ValueError):
        raise GenerationError(f"prompt {item!r:.60} is neither text nor a list of token ids.") \
            from None


def _validate(ids: list[int], i: int, cfg, max_new: int, truncate: bool) -> list[int]:
    if not ids:
        raise GenerationError(f"prompt {i} is empty after encoding; give at least one token.")
    bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise GenerationError(f"prompt {i} holds token id {bad}, outside the model's vocabulary "
                              f"[0, {cfg.vocab_size}).")
    context = cfg.max_position_embeddings
    if truncate and len(ids) + max_new > context:
        ids = ids[-max(context - max_new, context // 2, 1):]
    if len(ids) > context:
        where = (f"prompt {i} has {len(ids)} tokens but the model's context holds {context} "
                 "(max_position_embeddings); shorten it or ")
        raise GenerationError(where + "pass truncate=True to keep its last tokens.",
                              cli_message=where + "pass --truncate to keep its last tokens.")
    return ids


def eos_ids(model) -> tuple[int, ...]:
    """The model's stop token ids (config and tokenizer), inside the vocabulary."""
    ids = set(model.config.eos_ids)
    if model.tokenizer is not None:
        ids |= set(model.tokenizer.eos_ids)
    return tuple(sorted(t for t in ids if 0 <= t < model.config.vocab_size))


def request_knobs(sampling: list[SamplingParams], max_new: list[int]) -> dict:
    knobs = knob_arrays(sampling)
    knobs["max_new"] = np.array(max_new, np.int32)
    return knobs
