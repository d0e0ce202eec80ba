"""Library backends: vocabulary data -> a `Tokenizer` over sentencepiece or HF `tokenizers`.

- SentencePiece-style vocabularies become a sentencepiece `ModelProto` (BPE, byte fallback,
  identity normalizer, the dummy-prefix flag) loaded by `SentencePieceProcessor`; this is the
  model llama.cpp's SPM tokenizer re-implements.
- Byte-level BPE vocabularies become a `tokenizers` BPE over GPT-2 byte characters, pre-split by
  the regexes of a llama.cpp pre-tokenizer name (`_pretok.py`), with control tokens as special
  added tokens and user-defined tokens as ordinary added tokens (always matched, like llama.cpp's
  `tokenizer_st_partition`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer._core import Tokenizer
from bitnet_jax.tokenizer._decode import (
    BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
)
from bitnet_jax.tokenizer._pretok import PRE_TOKENIZERS, UNSUPPORTED_PRE, PreTokenizer


def spm_tokenizer(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int],
                  ids: Mapping[str, int | None], *, add_bos: bool, add_eos: bool,
                  add_space_prefix: bool, remove_extra_whitespaces: bool = False,
                  chat_template: str | None = None) -> Tokenizer:
    """A sentencepiece-backed Tokenizer from pieces, scores and GGUF token types."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    unk = ids.get("unk")
    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        entry = proto.pieces.add()
        entry.score = score
        if kind == UNKNOWN and i != unk:
            kind = UNUSED  # sentencepiece allows one unknown piece (phi-3 GGUFs type pads as 2)
        elif kind == USER_DEFINED:
            # GGUF converters store user-defined spaces as " "; sentencepiece matches them after
            # escaping spaces to "▁", so store them escaped to match the same text as llama.cpp.
            piece = piece.replace(" ", "\u2581")
        entry.piece = piece
        entry.type = kind
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = BYTE in types
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_space_prefix
    norm.remove_extra_whitespaces = remove_extra_whitespaces
    norm.escape_whitespaces = True
    return spm_from_proto(proto, ids, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template,
                          pieces=tokens, token_types=types)


def spm_from_proto(proto: Any, ids: Mapping[str, int | None], *, add_bos: bool, add_eos: bool,
                   chat_template: str | None, extra_eos_ids: Sequence[int] = (),
                   pieces: Sequence[str] | None = None,
                   token_types: Sequence[int] | None = None) -> Tokenizer:
    """A sentencepiece-backed Tokenizer from a `ModelProto` (its unk piece is forced to type 2).

    `pieces` / `token_types` override the proto's for decoding and the GGUF writer, so a GGUF
    vocabulary keeps its own texts and types where sentencepiece needs them adjusted.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    unk = ids.get("unk")
    if unk is None:
        raise TokenizerError(
            "the SentencePiece vocabulary has no unknown token (type 2); sentencepiece needs one, "
            "so set tokenizer.ggml.unknown_token_id."
        )
    proto.pieces[unk].type = UNKNOWN
    spec = proto.trainer_spec
    spec.unk_id = unk
    for name in ("bos", "eos", "pad"):
        setattr(spec, name + "_id", -1 if ids.get(name) is None else ids[name])
    try:
        processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece rejected the vocabulary: {first_line(e)}.") from None
    norm = proto.normalizer_spec
    valid = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
    # GGUF "llama" holds BPE pieces + scores with no normalization beyond "▁" escaping.
    plain = (spec.model_type == pb.TrainerSpec.BPE and not norm.precompiled_charsmap
             and norm.name in ("identity", "") and not spec.treat_whitespace_as_suffix)
    if pieces is None:
        pieces = [p.piece for p in proto.pieces]
    if token_types is None:
        token_types = [p.type if p.type in valid else NORMAL for p in proto.pieces]
    return Tokenizer(
        kind="spm", backend=processor, pieces=pieces, token_types=token_types,
        byte_level=False, scores=[p.score for p in proto.pieces], bos_id=ids.get("bos"),
        eos_id=ids.get("eos"), eot_id=ids.get("eot"), eom_id=ids.get("eom"), pad_id=ids.get("pad"),
        unk_id=unk, add_bos=add_bos, add_eos=add_eos,
        # sentencepiece drops the first piece's leading "▁" under either flag.
        add_space_prefix=norm.add_dummy_prefix or norm.remove_extra_whitespaces,
        chat_template=chat_template, extra_eos_ids=extra_eos_ids,
        gguf_unsupported=None if plain else (
            "this SentencePiece model is not a plain BPE model with the identity normalizer, "
            "so GGUF's 'llama' tokenizer cannot reproduce it."
        ),
    )


def bpe_tokenizer(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int],
                  ids: Mapping[str, int | None], *, pre: str, add_bos: bool, add_eos: bool,
                  chat_template: str | None = None,
                  extra_eos_ids: Sequence[int] = ()) -> Tokenizer:
    """A `tokenizers` byte-level BPE Tokenizer from GPT-2-character tokens and "a b" merges."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    family = pre_family(pre)
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut < 0:
            raise TokenizerError(
                f"BPE merge {m!r} has no space between its two parts; the merges are broken."
            )
        pairs.append((m[:cut], m[cut + 1:]))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("the BPE vocabulary lists the same token twice; the file is broken.")
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=family.ignore_merges,
                           fuse_unk=False, byte_fallback=False)
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocab
        raise TokenizerError(
            f"the BPE merges do not match the vocabulary: {first_line(e)}."
        ) from None
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in family.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if k == USER_DEFINED]
    backend.add_special_tokens(special)
    backend.add_tokens(user)
    return Tokenizer(
        kind="bpe", backend=backend, pieces=tokens, token_types=types, byte_level=True,
        merges=list(merges), bos_id=ids.get("bos"), eos_id=ids.get("eos"), eot_id=ids.get("eot"),
        eom_id=ids.get("eom"), pad_id=ids.get("pad"), unk_id=ids.get("unk"), add_bos=add_bos,
        add_eos=add_eos, chat_template=chat_template, pre=pre, extra_eos_ids=extra_eos_ids,
    )


def pre_family(pre: str) -> PreTokenizer:
    """The split rules of a `tokenizer.ggml.pre` name, or TokenizerError for unknown ones."""
    if pre in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pre]
    if pre in UNSUPPORTED_PRE:
        raise TokenizerError(
            f"pre-tokenizer '{pre}' needs llama.cpp's custom splitting code, which is not "
            "supported here; use the model's HF tokenizer.json instead."
        )
    raise TokenizerError(
        f"unknown pre-tokenizer '{pre}' in tokenizer.ggml.pre; it is not one of llama.cpp's "
        "known names, so the text split cannot be reproduced."
    )


def first_line(e: BaseException) -> str:
    """First line of an exception's text, for one-sentence error messages."""
    text = str(e).strip().splitlines()
    return text[0].rstrip(".") if text else type(e).__name__
