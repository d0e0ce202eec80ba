"""GGUF `tokenizer.*` metadata (plain Python values) <-> `Tokenizer`.

Key names and defaults follow llama.cpp (`llama_vocab::impl::load` in src/llama-vocab.cpp):
model "llama" is SentencePiece-style (bos 1, eos 2, unk 0, BOS added, dummy prefix on unless
`add_space_prefix` is false); model "gpt2" is byte-level BPE split by `tokenizer.ggml.pre`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer._backends import bpe_tokenizer, pre_family, spm_tokenizer
from bitnet_jax.tokenizer._core import Tokenizer
from bitnet_jax.tokenizer._decode import (
    BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
)

K = "tokenizer.ggml."
CHAT_KEY = "tokenizer.chat_template"
_REFUSED_MODELS = {
    "bert": "WordPiece (BERT) vocabularies",
    "t5": "Unigram (T5) vocabularies",
    "rwkv": "RWKV vocabularies",
    "plamo2": "PLaMo-2 vocabularies",
    "gemma4": "Gemma-4 vocabularies",
    "hybriddna": "HybriDNA vocabularies",
    "whitespace": "whitespace-split vocabularies",
    "no_vocab": "files without a vocabulary",
    "none": "files without a vocabulary",
}


def from_gguf_metadata(meta: Mapping[str, Any]) -> Tokenizer:
    """Build a Tokenizer from GGUF `tokenizer.*` metadata given as plain Python values.

    Args:
      meta: GGUF key -> value (`tokenizer.ggml.model`, `.tokens`, `.scores`, `.token_type`,
        `.merges`, `.pre`, special ids, `.add_bos_token`, ..., `tokenizer.chat_template`):
        str (or UTF-8 bytes), int, float, bool, and sequences of those (lists or 1-D arrays).
        Other keys are ignored.

    Returns:
      A Tokenizer: model "llama" -> sentencepiece, model "gpt2" -> HF `tokenizers` BPE.
    """
    model = _text(meta.get(K + "model"))
    if model is None:
        raise TokenizerError(
            "the GGUF metadata has no tokenizer.ggml.model key; the file holds no tokenizer, "
            "so load one from the model's HF folder instead."
        )
    if model in _REFUSED_MODELS:
        raise TokenizerError(
            f"tokenizer model '{model}': {_REFUSED_MODELS[model]} are not supported; "
            "only 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) are."
        )
    if model not in ("llama", "gpt2"):
        raise TokenizerError(
            f"unknown tokenizer model '{model}' in tokenizer.ggml.model; "
            "only 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) are supported."
        )
    tokens = [_text(t) for t in _required(meta, K + "tokens")]
    n = len(tokens)
    if n == 0:
        raise TokenizerError("tokenizer.ggml.tokens is empty; the GGUF vocabulary is broken.")
    # llama.cpp renames empty tokens so that every id keeps a unique text.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = _types(meta.get(K + "token_type"), n)
    ids = {name: _opt_id(meta, K + key, n) for name, key in (
        ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
        ("eom", "eom_token_id"), ("pad", "padding_token_id"), ("unk", "unknown_token_id"))}
    template = _text(meta.get(CHAT_KEY))
    if model == "llama":
        # llama.cpp's SPM defaults: bos 1, eos 2, unk 0, add BOS, dummy prefix on.
        # (An absent or out-of-range id falls back to the default, as in llama.cpp.)
        for name, default in (("bos", 1), ("eos", 2), ("unk", 0)):
            if ids[name] is None and default < n:
                ids[name] = default
        scores = meta.get(K + "scores")
        scores = [0.0] * n if scores is None else [float(s) for s in scores]
        if len(scores) < n:
            raise TokenizerError(
                f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens; the GGUF "
                "vocabulary is broken."
            )
        return spm_tokenizer(
            tokens, scores[:n], types, ids,
            add_bos=bool(meta.get(K + "add_bos_token", True)),
            add_eos=bool(meta.get(K + "add_eos_token", False)),
            add_space_prefix=bool(meta.get(K + "add_space_prefix", True)),
            remove_extra_whitespaces=bool(meta.get(K + "remove_extra_whitespaces", False)),
            chat_template=template,
        )
    merges = meta.get(K + "merges")
    if merges is None:
        raise TokenizerError(
            "the GGUF has tokenizer.ggml.model 'gpt2' but no tokenizer.ggml.merges; a BPE "
            "vocabulary needs its merges, so re-convert the model."
        )
    pre = _text(meta.get(K + "pre"))
    if pre is None:
        # bitnet.cpp's converter omits the key; its 128256-token vocabulary is llama3's.
        pre = "llama-bpe" if _is_llama3_vocab(tokens) else "default"
    family = pre_family(pre)
    add_bos = meta.get(K + "add_bos_token", family.add_bos)
    return bpe_tokenizer(
        tokens, [_text(m) for m in merges], types, ids, pre=pre,
        add_bos=bool(add_bos), add_eos=bool(meta.get(K + "add_eos_token", False)),
        chat_template=template,
    )


def to_gguf_metadata(tok: Tokenizer) -> dict[str, Any]:
    """GGUF `tokenizer.*` metadata (plain Python values) that rebuilds `tok`, for the GGUF writer.

    SentencePiece vocabularies become model "llama" (tokens, scores, token types); byte-level
    BPE vocabularies become model "gpt2" (tokens, merges, token types, `pre`). Raises
    TokenizerError for tokenizers GGUF cannot hold (e.g. a Unigram tokenizer.json).
    """
    if tok._gguf_unsupported:
        raise TokenizerError(tok._gguf_unsupported)
    meta: dict[str, Any] = {K + "model": "llama" if tok.kind == "spm" else "gpt2"}
    meta[K + "pre"] = tok.pre or "default"
    meta[K + "tokens"] = list(tok._pieces)
    meta[K + "token_type"] = list(tok._types)
    if tok.kind == "spm":
        meta[K + "scores"] = [float(s) for s in tok._scores]
        meta[K + "add_space_prefix"] = bool(tok.add_space_prefix)
    else:
        merges = tok._merges() if callable(tok._merges) else tok._merges
        meta[K + "merges"] = list(merges)
    for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                       ("eot_token_id", tok.eot_id), ("eom_token_id", tok.eom_id),
                       ("padding_token_id", tok.pad_id), ("unknown_token_id", tok.unk_id)):
        if value is not None:
            meta[K + key] = int(value)
    meta[K + "add_bos_token"] = bool(tok.add_bos)
    meta[K + "add_eos_token"] = bool(tok.add_eos)
    if tok.chat_template:
        meta[CHAT_KEY] = tok.chat_template
    return meta


# ---------------------------------------------------------------------- helpers


def _text(value: Any) -> Any:
    """GGUF strings as str (a reader may hand them over as UTF-8 bytes)."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerError(
                f"GGUF string {bytes(value)[:40]!r} is not UTF-8; the tokenizer metadata is broken."
            ) from None
    return value


def _is_llama3_vocab(tokens: Sequence[str]) -> bool:
    return len(tokens) == 128256 and tokens[128000] == "<|begin_of_text|>"


def _required(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise TokenizerError(f"the GGUF metadata has no {key}; the tokenizer is incomplete.")
    return meta[key]


def _opt_id(meta: Mapping[str, Any], key: str, n: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    value = int(value)
    # llama.cpp ignores out-of-range special ids ("bad special token") rather than failing.
    return value if 0 <= value < n else None


def _types(raw: Sequence[int] | None, n: int) -> list[int]:
    if raw is None:
        return [NORMAL] * n
    if len(raw) < n:
        raise TokenizerError(f"tokenizer.ggml.token_type has {len(raw)} entries for {n} tokens.")
    valid = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
    return [int(t) if int(t) in valid else NORMAL for t in list(raw)[:n]]
