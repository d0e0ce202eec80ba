"""`Tokenizer`: one encode/decode/chat API over sentencepiece, `tokenizers` and tiktoken.

Encoding is always delegated to the library that owns the vocabulary (no merge loop lives here).
Decoding is done here, from a per-id table, so that `decode` and the streaming
`IncrementalDecoder` share one definition and can never disagree:

- byte-level vocabularies (GPT-2/llama3 BPE, tiktoken): concatenate each token's bytes and decode
  UTF-8 with U+FFFD for invalid sequences (what tiktoken and HF's ByteLevel decoder do);
- SentencePiece-style vocabularies: sentencepiece's own rules (`▁` -> space, `<0xNN>` byte pieces
  decoded per run with one U+FFFD per bad byte, the first piece's leading `▁` dropped when the
  model adds a dummy prefix, `<unk>` -> " ⁇ ", control pieces invisible).

Token types use GGUF's numbering (gguf `TokenType`): 1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from bitnet_jax.errors import TokenizerError
from bitnet_jax.tokenizer._chat import apply_chat_template as _render_chat
from bitnet_jax.tokenizer._decode import (
    CONTROL, NORMAL, UNKNOWN, SpmStream, byte_level_bytes, check_utf8, spm_bytes,
)

# Token texts that end a turn or a text (llama.cpp's `special_eog_ids`, src/llama-vocab.cpp).
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
)
# llama.cpp's end-of-turn candidates, in our order of preference.
EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)


class Tokenizer:
    """A loaded tokenizer. Build it with `bitnet_jax.load_tokenizer(path)` (any file a model ships,
    GGUF included) or `bitnet_jax.tokenizer.from_gguf_metadata(meta)`.

    The constructor takes the library object (`backend`) that encodes, and the vocabulary as
    stored: `pieces` (SentencePiece pieces or GPT-2-character strings, one per id),
    `token_types` (GGUF numbering), SentencePiece `scores` or BPE `merges` for the GGUF writer.

    Attributes:
      kind: "spm" (sentencepiece), "bpe" (HF `tokenizers`) or "tiktoken": the encoding library.
      vocab_size: V, the number of ids (base vocabulary plus added/special tokens).
      bos_id, eos_id, eot_id, eom_id, pad_id, unk_id: special ids or None.
      eos_ids: every id that ends a turn or a text (eos, eot, eom and the known end tokens).
      add_bos, add_eos: what `encode(..., add_special=True)` adds.
      chat_template: the model's Jinja chat template, or None.
      pre: GGUF pre-tokenizer name for byte-level BPE vocabularies, else None.
    """

    def __init__(
        self,
        *,
        kind: str,
        backend: Any,
        pieces: Sequence[str],
        token_types: Sequence[int],
        byte_level: bool,
        token_bytes: Sequence[bytes] | None = None,
        scores: Sequence[float] | None = None,
        merges: Sequence[str] | Callable[[], Sequence[str]] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        eom_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        add_space_prefix: bool = False,
        chat_template: str | None = None,
        pre: str | None = None,
        extra_eos_ids: Iterable[int] = (),
        gguf_unsupported: str | None = None,
    ):
        self.kind = kind
        self._backend = backend
        self._pieces = list(pieces)
        self._types = list(token_types)
        self._byte_level = byte_level
        self._scores = None if scores is None else list(scores)
        self._merges = merges
        self.vocab_size = len(self._pieces)
        if len(self._types) != self.vocab_size:
            raise TokenizerError(
                f"the tokenizer has {self.vocab_size} tokens but {len(self._types)} token types; "
                "the vocabulary file is inconsistent."
            )
        ids = {"bos": bos_id, "eos": eos_id, "eot": eot_id, "eom": eom_id, "pad": pad_id,
               "unk": unk_id}
        for name, value in ids.items():
            if value is not None and not 0 <= value < self.vocab_size:
                raise TokenizerError(
                    f"the {name} token id {value} is outside the vocabulary of {self.vocab_size} "
                    "tokens; fix the tokenizer metadata."
                )
        self._lookup = {p: i for i, p in enumerate(self._pieces)}
        # Like llama.cpp, find end-of-turn / end-of-message tokens by their text when not given.
        if eot_id is None:
            eot_id = next((self._lookup[t] for t in EOT_TEXTS if t in self._lookup), None)
        if eom_id is None:
            eom_id = self._lookup.get("<|eom_id|>")
        self.bos_id, self.eos_id, self.eot_id, self.eom_id = bos_id, eos_id, eot_id, eom_id
        self.pad_id, self.unk_id = pad_id, unk_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.add_eos = bool(add_eos) and eos_id is not None
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.pre = pre
        self._gguf_unsupported = gguf_unsupported

        eog = {i for i in (eos_id, eot_id, eom_id) if i is not None}
        eog.update(int(i) for i in extra_eos_ids if 0 <= int(i) < self.vocab_size)
        eog_texts = set(EOG_TEXTS)
        eog.update(i for i, p in enumerate(self._pieces)
                   if p in eog_texts and self._types[i] != NORMAL)
        self.eos_ids = tuple(sorted(eog))
        self._eos_set = frozenset(eog)

        if byte_level:
            if token_bytes is None:
                token_bytes = byte_level_bytes(self._pieces, self._types)
            self._bytes = list(token_bytes)
        else:
            self._bytes = spm_bytes(self._pieces, self._types)
        self._control = bytearray(t == CONTROL for t in self._types)
        self._special_re = None  # built lazily for sentencepiece parse_special

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, add_special: bool = False,
               parse_special: bool = False) -> list[int]:
        """Text -> token ids.

        Args:
          text: the string to encode.
          add_special: prepend BOS / append EOS as the model's add_bos / add_eos flags say.
          parse_special: turn the text of control tokens (e.g. "<|eot_id|>") into their ids;
            otherwise such text is encoded as ordinary characters.

        Returns:
          ids: [T] token ids.

        Raises:
          TokenizerError: `text` is not a str, or is not valid UTF-8 (holds lone surrogates, as
            `sys.argv` does for bytes that are not UTF-8).
        """
        if not isinstance(text, str):
            raise TokenizerError(
                f"encode expects a str, got {type(text).__name__}; decode bytes to text first."
            )
        check_utf8(text)
        ids = self._encode_text(text, parse_special)
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def _encode_text(self, text: str, parse_special: bool) -> list[int]:
        if self.kind == "tiktoken":
            if parse_special:
                return self._backend.encode(text, allowed_special="all", disallowed_special=())
            return self._backend.encode_ordinary(text)
        if self.kind == "bpe":
            # `encode_special_tokens=True` makes `tokenizers` treat special added tokens as text;
            # non-special (user-defined) added tokens are still matched, as in llama.cpp. The flag
            # lives on the shared backend, so one Tokenizer should not encode from two threads.
            self._backend.encode_special_tokens = not parse_special
            return self._backend.encode(text, add_special_tokens=False).ids
        if not parse_special:
            return self._backend.encode(text)
        pattern = self._special_pattern()
        if pattern is None:
            return self._backend.encode(text)
        ids: list[int] = []
        start = 0
        # Each stretch of text between control tokens is encoded on its own, so it gets the dummy
        # prefix again, as llama.cpp's SPM path does after a special token.
        for m in pattern.finditer(text):
            if m.start() > start:
                ids.extend(self._backend.encode(text[start:m.start()]))
            ids.append(self._lookup[m.group()])
            start = m.end()
        if start < len(text):
            ids.extend(self._backend.encode(text[start:]))
        return ids

    def _special_pattern(self) -> re.Pattern | None:
        if self._special_re is None:
            texts = sorted({self._pieces[i] for i, t in enumerate(self._types)
                            if t in (CONTROL, UNKNOWN) and self._pieces[i]}, key=len, reverse=True)
            # Longest first: Python's alternation is leftmost-first, so this is leftmost-longest.
            self._special_re = re.compile("|".join(map(re.escape, texts))) if texts else False
        return self._special_re or None

    # ------------------------------------------------------------------ decode

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Token ids -> text.

        Args:
          ids: [T] token ids (list, tuple or 1-D array).
          skip_special: drop control tokens (BOS, EOS, <|eot_id|>, ...) instead of writing
            their text.

        Returns:
          The decoded string; bytes that are not valid UTF-8 become U+FFFD.
        """
        ids = self._check_ids(ids)
        if self._byte_level:
            table, control = self._bytes, self._control
            if skip_special:
                data = b"".join([table[i] for i in ids if not control[i]])
            else:
                data = b"".join([table[i] for i in ids])
            return data.decode("utf-8", errors="replace")
        state = SpmStream(self, skip_special)
        return "".join([state.push(i) for i in ids]) + state.flush()

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"decode expects a sequence of integer token ids ({e}).") from None
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"token id {bad[0]} is outside the vocabulary (valid ids are "
                f"0..{self.vocab_size - 1}); "
                "the ids come from a different tokenizer or model."
            )
        return out

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for inside a text (control tokens give their own text)."""
        return self._bytes[self._check_ids([token_id])[0]]

    def token_to_piece(self, token_id: int) -> str:
        """Readable text of one token for display: its text, or `<0xNN>` for bytes that are not
        UTF-8 on their own."""
        data = self.id_to_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<0x{b:02X}>" for b in data)

    def token_type(self, token_id: int) -> int:
        """GGUF token type of an id: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
        6 byte."""
        return self._types[self._check_ids([token_id])[0]]

    def is_eos(self, token_id: int) -> bool:
        """True when `token_id` ends a turn or a text (any id in `eos_ids`)."""
        return int(token_id) in self._eos_set

    def piece_to_id(self, piece: str) -> int | None:
        """Id of a vocabulary entry by its stored text (e.g. "<|eot_id|>"), or None."""
        return self._lookup.get(piece)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template (or BitNet-2B4T's format).

        Args:
          messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
          add_generation_prompt: end with the assistant prefix so the model answers next.

        Returns:
          The prompt text; encode it with `parse_special=True` to get the control tokens.

        Raises:
          TokenizerError: malformed messages, a message that is not valid UTF-8, or a template
            that fails on them.
        """
        return _render_chat(self, messages, add_generation_prompt)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, pre={self.pre!r})")


class IncrementalDecoder:
    """Streaming detokenizer, the project's one: feed ids one at a time, get printable text.

    Contract:
      push(token_id) -> str: the text that token completes, possibly "". It never contains half
        a UTF-8 character: bytes of a character split across byte-level BPE tokens or `<0xNN>`
        byte pieces are held back until the character is whole (or proven invalid, then U+FFFD).
      flush() -> str: the rest (held-back bytes that never completed become U+FFFD); the decoder
        is then reset for a new text.
      So `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special)` for
      every id sequence, and each push costs O(1) in the length of the text so far.

    Args:
      tokenizer: the Tokenizer whose ids are pushed.
      skip_special: drop control tokens (BOS, EOS, <|eot_id|>, ...) as `decode` does.

    Raises TokenizerError (from push) for an id outside the vocabulary.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._skip = skip_special
        self.reset()

    def reset(self) -> None:
        """Start a new text."""
        if self._tok._byte_level:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._spm = SpmStream(self._tok, self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly ""), never half a character."""
        tok = self._tok
        i = tok._check_ids([token_id])[0]
        if tok._byte_level:
            if self._skip and tok._control[i]:
                return ""
            return self._utf8.decode(tok._bytes[i], final=False)
        return self._spm.push(i)

    def flush(self) -> str:
        """End of text: return what is still held back (incomplete bytes become U+FFFD)."""
        if self._tok._byte_level:
            out = self._utf8.decode(b"", final=True)
        else:
            out = self._spm.flush()
        self.reset()
        return out
