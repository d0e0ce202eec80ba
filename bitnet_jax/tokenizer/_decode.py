"""Per-token byte tables and sentencepiece's decoding rules, shared by `decode` and streaming.

Token types use GGUF's numbering (gguf `TokenType`): 1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer._pretok import unicode_to_bytes

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space "▁"
UNK_SURFACE = " \u2047 "  # sentencepiece's default unk_surface " ⁇ "


def check_utf8(text: str, what: str = "the text") -> None:
    """Raise TokenizerError when `text` cannot be written as UTF-8 (it holds lone surrogates).

    Python gives such strings for bytes that are not UTF-8: `sys.argv` maps the byte 0xFF to
    U+DCFF. sentencepiece and `tokenizers` would fail on them with a traceback of their own.
    """
    if text.isascii():  # O(1) for str; the common case
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"{what} is not valid UTF-8: it holds U+{ord(text[e.start]):04X} (a lone surrogate) at "
            f"character {e.start}, which comes from bytes that are not UTF-8 (e.g. a command-line "
            "argument or a file in another encoding); pass text decoded as UTF-8."
        ) from None


class SpmStream:
    """sentencepiece's decoding rules as a stream (src/sentencepiece_processor.cc `Decode`).

    `tok` is a Tokenizer (read for its piece, type and byte tables and `add_space_prefix`).
    """

    def __init__(self, tok: Any, skip_special: bool):
        self._pieces, self._types, self._bytes = tok._pieces, tok._types, tok._bytes
        self._skip = skip_special
        self._bos_ws = tok.add_space_prefix  # a leading "▁" of the first piece is the dummy prefix
        self._run = bytearray()  # pending <0xNN> bytes

    def push(self, i: int) -> str:
        kind = self._types[i]
        if kind == BYTE:
            self._run += self._bytes[i]
            return self._emit(drain_utf8(self._run, final=False))
        out = self._emit(drain_utf8(self._run, final=True)) if self._run else ""
        if kind == CONTROL:
            return out if self._skip else out + self._emit(self._pieces[i])
        if kind == UNKNOWN:
            return out + self._emit(UNK_SURFACE)
        piece = self._pieces[i]
        if self._bos_ws and piece.startswith(SPACE):
            piece = piece[1:]
            self._bos_ws = False
        return out + self._emit(piece.replace(SPACE, " "))

    def flush(self) -> str:
        return self._emit(drain_utf8(self._run, final=True))

    def _emit(self, text: str) -> str:
        if text:
            self._bos_ws = False
        return text


def drain_utf8(buf: bytearray, final: bool) -> str:
    """Decode a run of byte pieces the way sentencepiece does: one U+FFFD per byte that does not
    start a valid character. Unless `final`, an incomplete but still valid tail stays in `buf`."""
    out = []
    i, n = 0, len(buf)
    while i < n:
        b = buf[i]
        if b < 0x80:
            out.append(chr(b))
            i += 1
            continue
        size = 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 0
        if size and i + size <= n:
            try:
                out.append(bytes(buf[i:i + size]).decode("utf-8"))
                i += size
                continue
            except UnicodeDecodeError:
                pass
        elif size and not final and _utf8_prefix_ok(buf[i:]):
            break
        out.append("\ufffd")
        i += 1
    del buf[:i]
    return "".join(out)


def _utf8_prefix_ok(seq: bytes | bytearray) -> bool:
    """True when `seq` (shorter than its character) can still be completed to valid UTF-8."""
    lead = seq[0]
    lo, hi = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF),
              0xF4: (0x80, 0x8F)}.get(lead, (0x80, 0xBF))
    if len(seq) > 1 and not lo <= seq[1] <= hi:
        return False
    return all(0x80 <= c <= 0xBF for c in seq[2:])


def byte_level_bytes(pieces: Sequence[str], types: Sequence[int]) -> list[bytes]:
    """Bytes of each byte-level BPE token: GPT-2 characters -> bytes; added tokens are stored as
    plain text (llama.cpp and the HF converters write them unmapped)."""
    u2b = unicode_to_bytes()
    out = []
    for piece, kind in zip(pieces, types):
        if kind in (CONTROL, USER_DEFINED, UNKNOWN) or any(c not in u2b for c in piece):
            out.append(piece.encode("utf-8"))
        else:
            out.append(bytes([u2b[c] for c in piece]))
    return out


def spm_bytes(pieces: Sequence[str], types: Sequence[int]) -> list[bytes]:
    """Bytes of each SentencePiece token in the middle of a text."""
    out = []
    for piece, kind in zip(pieces, types):
        if kind == BYTE:
            out.append(bytes([int(piece[3:5], 16)]))
        elif kind == UNKNOWN:
            out.append(UNK_SURFACE.encode("utf-8"))
        else:
            out.append(piece.replace(SPACE, " ").encode("utf-8"))
    return out
