"""Tokenizer files -> `Tokenizer`: SentencePiece and tiktoken `tokenizer.model`, HF
`tokenizer.json`, GPT-2 `vocab.json` + `merges.txt`, each with settings from the HF side files
(`cfg`, see `_load._hf_config`).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer._backends import bpe_tokenizer, first_line, spm_from_proto
from bitnet_jax.tokenizer._core import Tokenizer
from bitnet_jax.tokenizer._decode import (
    BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
)
from bitnet_jax.tokenizer._pretok import GPT2, LLAMA3, bytes_to_unicode, pre_name_for_regexes

# llama3 / BitNet-2B4T special tokens, appended at id 128000 (meta-llama/llama-models
# models/llama3/tokenizer.py; data README §2).
LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(5, 251)),
)
# tiktoken's r50k_base pattern (GPT-2), equivalent to _pretok.GPT2.
_R50K_PAT = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def sentencepiece_file(path: Path, cfg: Mapping[str, Any]) -> Tokenizer:
    """A SentencePiece `tokenizer.model`, plus HF `added_tokens.json` entries appended after it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:
        raise TokenizerError(
            f"{path} is not a SentencePiece model or tiktoken vocabulary."
        ) from None
    if not proto.pieces:
        raise TokenizerError(f"{path} is not a SentencePiece model (it has no pieces).")
    for tid, text, special in _added_tokens(cfg, len(proto.pieces)):
        if tid != len(proto.pieces):
            raise TokenizerError(
                f"added token {text!r} has id {tid} but the SentencePiece model ends at "
                f"{len(proto.pieces) - 1}; added tokens must follow it without gaps."
            )
        # Appended pieces: sentencepiece matches user-defined ones as atoms, never control ones.
        entry = proto.pieces.add()
        entry.piece = text
        entry.score = 0.0
        entry.type = CONTROL if special else USER_DEFINED
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    spec = proto.trainer_spec

    def pick(name: str, fallback: int) -> int | None:
        text = cfg.get(name + "_token")
        if text is not None and text in index:
            return index[text]
        return fallback if 0 <= fallback < len(proto.pieces) else None

    ids = {"bos": pick("bos", spec.bos_id), "eos": pick("eos", spec.eos_id),
           "unk": pick("unk", spec.unk_id), "pad": pick("pad", spec.pad_id)}
    return spm_from_proto(
        proto, ids, add_bos=bool(cfg.get("add_bos_token", True)),
        add_eos=bool(cfg.get("add_eos_token", False)), chat_template=cfg.get("chat_template"),
        extra_eos_ids=cfg.get("extra_eos_ids", ()),
    )


def tiktoken_file(path: Path, cfg: Mapping[str, Any]) -> Tokenizer:
    """A tiktoken vocabulary (`base64 rank` per line): llama3 (128000 ranks) or GPT-2 (50256)."""
    import tiktoken

    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(
                f"{path} line {lineno} is not 'base64 rank'; the tiktoken file is broken."
            ) from None
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerError(
            f"{path} ranks are not 0..{n - 1} without gaps; the tiktoken file is broken."
        )
    if n == 128000:
        specials, pat, pre = LLAMA3_SPECIALS, LLAMA3, "llama-bpe"
        ids = {"bos": 128000, "eos": 128001}
        add_bos = True
    elif n == 50256:
        specials, pat, pre = ("<|endoftext|>",), _R50K_PAT, "gpt-2"
        ids = {"bos": 50256, "eos": 50256}
        add_bos = False
    else:
        raise TokenizerError(
            f"{path} is a tiktoken vocabulary of {n} ranks; only llama3 (128000) and GPT-2 (50256) "
            "are known, so their split pattern and special tokens can be set."
        )
    special_ids = {t: n + i for i, t in enumerate(specials)}
    for name in ("bos", "eos", "pad"):
        text = cfg.get(name + "_token")
        if text in special_ids:
            ids[name] = special_ids[text]
    enc = tiktoken.Encoding(path.stem, pat_str=pat, mergeable_ranks=ranks,
                            special_tokens=special_ids)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    token_bytes = by_rank + [t.encode() for t in specials]
    b2u = bytes_to_unicode()
    pieces = ["".join(b2u[b] for b in t) for t in by_rank] + list(specials)
    types = [NORMAL] * n + [CONTROL] * len(specials)
    return Tokenizer(
        kind="tiktoken", backend=enc, pieces=pieces, token_types=types, byte_level=True,
        token_bytes=token_bytes, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids.get("pad"),
        add_bos=bool(cfg.get("add_bos_token", add_bos)),
        add_eos=bool(cfg.get("add_eos_token", False)), chat_template=cfg.get("chat_template"),
        pre=pre, extra_eos_ids=cfg.get("extra_eos_ids", ()),
        merges=lambda: tiktoken_merges(ranks),  # only the GGUF writer needs them; seconds to derive
    )


def tiktoken_merges(ranks: Mapping[bytes, int]) -> list[str]:
    """GGUF merges ("a b" in GPT-2 characters) equivalent to tiktoken ranks.

    Every split of a token into two vocabulary entries becomes a merge ranked by the token, the
    pairs of one token ordered by the ranks of their parts: the same list HF's TikTokenConverter
    and llama.cpp's llama3 GGUFs carry (280147 merges for llama3).
    """
    b2u = bytes_to_unicode()
    chars = {t: "".join(b2u[b] for b in t) for t in ranks}
    found = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                 for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        local.sort()
        found.extend((rank, a, b) for _, _, a, b in local)
    found.sort(key=lambda x: x[0])
    return [f"{chars[a]} {chars[b]}" for _, a, b in found]


def vocab_merges_files(vocab_path: Path, merges_path: Path, cfg: Mapping[str, Any]) -> Tokenizer:
    """GPT-2 style `vocab.json` + `merges.txt` (byte-level BPE, GPT-2 split)."""
    if not merges_path.exists():
        raise TokenizerError(
            f"{vocab_path} has no merges.txt beside it; a BPE vocabulary needs its merges file."
        )
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{vocab_path} is not a token -> id JSON object.")
    for tid, text, _ in _added_tokens(cfg, 0):
        vocab.setdefault(text, tid)
    n = max(vocab.values()) + 1
    tokens: list[str | None] = [None] * n
    for text, tid in vocab.items():
        tokens[tid] = text
    if any(t is None for t in tokens):
        missing = tokens.index(None)
        raise TokenizerError(
            f"{vocab_path} has no token with id {missing}; ids must be 0..{n - 1}."
        )
    merges = [line for line in merges_path.read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    specials = _special_texts(cfg)
    added = {text: special for _, text, special in _added_tokens(cfg, 0)}
    types = []
    for t in tokens:
        if t in specials or added.get(t) or (t.startswith("<|") and t.endswith("|>")):
            types.append(CONTROL)
        elif t in added:
            types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
    index = {t: i for i, t in enumerate(tokens)}
    eot = index.get("<|endoftext|>")
    ids = {name: index.get(cfg.get(name + "_token"), eot if name in ("bos", "eos") else None)
           for name in ("bos", "eos", "pad", "unk")}
    return bpe_tokenizer(tokens, merges, types, ids, pre="gpt-2",
                         add_bos=bool(cfg.get("add_bos_token", False)),
                         add_eos=bool(cfg.get("add_eos_token", False)),
                         chat_template=cfg.get("chat_template"),
                         extra_eos_ids=cfg.get("extra_eos_ids", ()))


def hf_json_file(path: Path, cfg: Mapping[str, Any]) -> Tokenizer:
    """An HF `tokenizer.json` (BPE or Unigram with a ByteLevel or SentencePiece-style decoder)."""
    import tokenizers

    spec = _read_json(path)
    model = spec.get("model") or {}
    mtype = model.get("type") or ("BPE" if "merges" in model else None)
    if mtype not in ("BPE", "Unigram"):
        raise TokenizerError(
            f"{path} uses a {mtype or 'unknown'} model; only BPE and Unigram tokenizer.json files "
            "are supported (WordPiece/WordLevel are not)."
        )
    try:
        backend = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:
        raise TokenizerError(f"{path} is not a valid tokenizer.json: {first_line(e)}.") from None
    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    # Unused ids get placeholder texts, as llama.cpp's converter writes them ("[PAD<id>]").
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, tid in vocab.items():
        tokens[tid] = text
    added = backend.get_added_tokens_decoder()
    byte_level = _uses_byte_level(spec.get("decoder"))
    if not byte_level and not _uses_metaspace(spec.get("decoder")):
        raise TokenizerError(
            f"{path} has a decoder of type {(spec.get('decoder') or {}).get('type')}; only "
            "ByteLevel and SentencePiece-style (Metaspace / ByteFallback) decoders are supported."
        )
    unk_text = model.get("unk_token") or cfg.get("unk_token")
    if mtype == "Unigram" and model.get("unk_id") is not None:
        unk_text = tokens[model["unk_id"]]
    types = []
    for i, t in enumerate(tokens):
        if unk_text is not None and t == unk_text:
            types.append(UNKNOWN)
        elif i in added:
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif not byte_level and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL if vocab.get(t) == i else UNUSED)
    index = {t: i for i, t in enumerate(tokens)}
    ids = {name: index.get(cfg.get(name + "_token")) for name in ("bos", "eos", "pad", "unk")}
    if ids["unk"] is None and unk_text is not None:
        ids["unk"] = index.get(unk_text)
    with_special = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    # Without an explicit flag, the post-processor tells: does encoding "a" gain a BOS / EOS?
    added_front = with_special[:1] != plain[:1] and with_special[:1] == [ids["bos"]]
    added_back = with_special[-1:] != plain[-1:] and with_special[-1:] == [ids["eos"]]
    add_bos = cfg.get("add_bos_token", added_front)
    add_eos = cfg.get("add_eos_token", added_back)
    merges, pre, unsupported = None, None, None
    if byte_level and mtype == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        pre = _pre_name_from_json(spec.get("pre_tokenizer"))
        if pre is None or spec.get("normalizer"):
            unsupported = (f"{path}'s normalizer or pre-tokenizer matches no llama.cpp "
                           "pre-tokenizer name, so it cannot be stored as a GGUF 'gpt2' tokenizer.")
    else:
        unsupported = (f"{path} is a SentencePiece-style or Unigram tokenizer.json; only "
                       "SentencePiece models and byte-level BPE can be stored as GGUF metadata.")
    return Tokenizer(
        kind="bpe", backend=backend, pieces=tokens, token_types=types, byte_level=byte_level,
        merges=merges, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], unk_id=ids["unk"],
        add_bos=bool(add_bos), add_eos=bool(add_eos), chat_template=cfg.get("chat_template"),
        pre=pre, add_space_prefix=not byte_level and _strips_first_space(spec.get("decoder")),
        extra_eos_ids=cfg.get("extra_eos_ids", ()), gguf_unsupported=unsupported,
    )


# ---------------------------------------------------------------------- helpers


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON ({first_line(e)}).") from None


def _added_tokens(cfg: Mapping[str, Any], start: int) -> list[tuple[int, str, bool]]:
    """(id, text, special) for added tokens at or above `start`, sorted by id."""
    out = {}
    for tid, text in (cfg.get("added_tokens") or {}).items():
        out[int(tid)] = (text, text in _special_texts(cfg))
    for tid, entry in (cfg.get("added_tokens_decoder") or {}).items():
        out[int(tid)] = (entry["content"], bool(entry.get("special", False)))
    return [(i, t, s) for i, (t, s) in sorted(out.items()) if i >= start]


def _special_texts(cfg: Mapping[str, Any]) -> set[str]:
    return {cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}


def _decoder_types(dec: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not dec:
        return []
    if dec.get("type") == "Sequence":
        return [d for sub in dec.get("decoders", []) for d in _decoder_types(sub)]
    return [dec]


def _uses_byte_level(dec: Mapping[str, Any] | None) -> bool:
    return any(d.get("type") == "ByteLevel" for d in _decoder_types(dec))


def _uses_metaspace(dec: Mapping[str, Any] | None) -> bool:
    parts = _decoder_types(dec)
    return any(
        d.get("type") in ("Metaspace", "ByteFallback")
        or (d.get("type") == "Replace" and (d.get("pattern") or {}).get("String") == "\u2581")
        for d in parts
    )


def _strips_first_space(dec: Mapping[str, Any] | None) -> bool:
    for d in _decoder_types(dec):
        if d.get("type") == "Strip" and d.get("start", 0) >= 1:
            return True
        if d.get("type") == "Metaspace" and (d.get("add_prefix_space", False)
                                             or d.get("prepend_scheme") in ("first", "always")):
            return True
    return False


def _pre_name_from_json(pre: Mapping[str, Any] | None) -> str | None:
    """The GGUF `pre` name of an HF pre_tokenizer made of regex Splits and ByteLevel."""
    if not pre:
        return None
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = []
    for p in parts:
        if p.get("type") == "Split" and p.get("behavior") == "Isolated" and not p.get("invert"):
            pattern = p.get("pattern") or {}
            regexes.append(pattern.get("Regex") or re.escape(pattern.get("String", "")))
        elif p.get("type") == "ByteLevel":
            if p.get("use_regex", True):
                regexes.append(GPT2)
        elif p.get("type") == "Digits":
            regexes.append(r"\p{N}" if p.get("individual_digits") else r"\p{N}+")
        else:
            return None
    return pre_name_for_regexes(tuple(regexes))
