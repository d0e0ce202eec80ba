"""Tokenizer API: encode/decode, special tokens, streaming, chat templates, loading, errors, CLI.

Small synthetic vocabularies (built here through `from_gguf_metadata`) cover the logic
without any data; the real Llama-2 / llama3 / GPT-2 files in ../shared/data/tokenizers (skipped
when absent) cover the three backends.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import random
from pathlib import Path

import pytest

from bitnet_jax.errors import BitNetError, TokenizerError
import bitnet_jax
import bitnet_jax.tokenizer
from bitnet_jax import load_tokenizer
from bitnet_jax.cli.tokenize import main as tokenize_main
from bitnet_jax.tokenizer import (
    IncrementalDecoder, Tokenizer, from_gguf_metadata, load_tokenizer_files, to_gguf_metadata,
)
from bitnet_jax.tokenizer._pretok import PRE_TOKENIZERS, bytes_to_unicode

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZERS = SHARED / "tokenizers"
LLAMA2 = "llama2-spm/tokenizer.model"
LLAMA3 = "llama3-tiktoken/tokenizer.model"
GPT2 = "gpt2/vocab.json"
K = "tokenizer.ggml."

TEXTS = [
    "", " ", "Hello world", " Hello  world ", "\n\n\t x \r\n", "naïve café, Äpfel 東京 нещо",
    "emoji 🦙🚀 😶\u200d🌫️ ✅", "ied 4 ½ months 1314151 3.3", "I've been 'told he's there, 'RE",
    "<|eot_id|> <s> </s> <|endoftext|> <unk>", "कान्ति ពិសេស", "tabs\tand\u00a0nbsp",
]
# BitNet-2B4T's tokenizer_config.json template (spec §3): Role: content<|eot_id|>, "Assistant: ".
BITNET_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def _shared(rel: str, folder: Path = TOKENIZERS) -> Path:
    path = folder / rel
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is missing")
    return path


@functools.cache
def _load(rel: str) -> Tokenizer:
    return load_tokenizer(_shared(rel))


def _real(name: str) -> Tokenizer:
    return _load({"spm": LLAMA2, "tiktoken": LLAMA3, "bpe": GPT2}[name])


def _any(kind: str) -> Tokenizer:
    """A real tokenizer ("spm", "tiktoken", "bpe") or a synthetic one ("tiny-spm", "tiny-bpe")."""
    if kind == "tiny-spm":
        return from_gguf_metadata(_tiny_spm_meta())
    if kind == "tiny-bpe":
        return from_gguf_metadata(_tiny_bpe_meta(**{"tokenizer.chat_template": BITNET_TEMPLATE}))
    return _real(kind)


# ---------------------------------------------------------------------- synthetic vocabularies

BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]
BPE_WORDS = ["Ġt", "he", "Ġthe", "Ġw", "or", "Ġwor", "ld", "Ġworld"]
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
BPE_SPECIAL = ["<|endoftext|>", "<|eot_id|>", "<tool>"]


def _tiny_bpe_meta(**extra) -> dict:
    tokens = BYTE_CHARS + BPE_WORDS + BPE_SPECIAL
    meta = {
        K + "model": "gpt2", K + "pre": "gpt-2", K + "tokens": tokens, K + "merges": BPE_MERGES,
        K + "token_type": [1] * (256 + len(BPE_WORDS)) + [3, 3, 4],
        K + "bos_token_id": 264, K + "eos_token_id": 264,
    }
    meta.update(extra)
    return meta


SPM_PIECES = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "\u2581h", "ll", "\u2581he", "llo",
              "\u2581hello", "\u2581w", "or", "ld", "\u2581wor", "\u2581world"]


def _tiny_spm_meta(**extra) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    meta = {
        K + "model": "llama", K + "tokens": tokens,
        K + "scores": [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))],
        K + "token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
        K + "bos_token_id": 1, K + "eos_token_id": 2, K + "unknown_token_id": 0,
    }
    meta.update(extra)
    return meta


def _sid(piece: str) -> int:
    return 259 + SPM_PIECES.index(piece)


def test_tiny_bpe_merges_and_special_tokens():
    tok = from_gguf_metadata(_tiny_bpe_meta())
    assert tok.kind == "bpe" and tok.vocab_size == 267
    assert tok.encode(" the world") == [258, 263]
    assert tok.encode("the") == [ord("t"), 257]  # no "t"+"he" merge: only "Ġt"+"he"
    assert tok.encode("<|eot_id|>") == [ord(c) for c in "<|eot_id|>"]
    assert tok.encode("<|eot_id|>", parse_special=True) == [265]
    # user-defined tokens are always matched, control tokens only when asked (llama.cpp semantics)
    assert tok.encode("a<tool>b") == [ord("a"), 266, ord("b")]
    assert tok.decode([258, 265, 263]) == " the world"
    assert tok.decode([258, 265, 263], skip_special=False) == " the<|eot_id|> world"
    assert tok.eos_ids == (264, 265) and tok.eot_id == 265 and tok.is_eos(265)


def test_tiny_bpe_round_trips_any_text():
    tok = from_gguf_metadata(_tiny_bpe_meta())
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_tiny_spm_dummy_prefix_and_byte_fallback():
    tok = from_gguf_metadata(_tiny_spm_meta())
    assert tok.kind == "spm" and tok.add_bos and not tok.add_eos
    assert tok.encode("hello world") == [_sid("\u2581hello"), _sid("\u2581world")]
    assert tok.encode("hello", add_special=True) == [1, _sid("\u2581hello")]
    assert tok.encode("é") == [_sid("\u2581"), 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode(" hello  é\n")) == " hello  é\n"
    assert tok.encode("<s>hello</s>", parse_special=True) == [1, _sid("\u2581hello"), 2]
    assert tok.encode("<s>") != [1]
    no_prefix = from_gguf_metadata(_tiny_spm_meta(**{K + "add_space_prefix": False}))
    assert no_prefix.encode("hello")[0] != _sid("\u2581hello")
    assert no_prefix.decode([_sid("\u2581hello")]) == " hello"
    assert tok.decode([_sid("\u2581hello")]) == "hello"


def test_gguf_metadata_as_bytes_and_arrays():
    # A GGUF reader may hand strings over as UTF-8 bytes and numeric arrays as numpy arrays.
    import numpy as np

    meta = _tiny_spm_meta()
    raw = {k: ([t.encode() for t in v] if k == K + "tokens" else v.encode() if isinstance(v, str)
               else np.asarray(v, np.float32 if k == K + "scores" else np.int32)
               if isinstance(v, list) else v) for k, v in meta.items()}
    assert from_gguf_metadata(raw).encode("hello world") == [_sid("\u2581hello"),
                                                                       _sid("\u2581world")]
    bpe = {k: [t.encode() for t in v] if isinstance(v, list) and isinstance(v[0], str) else v
           for k, v in _tiny_bpe_meta().items()}
    assert from_gguf_metadata(bpe).encode(" the world") == [258, 263]


def test_gguf_defaults_and_eos_detection():
    tok = from_gguf_metadata(_tiny_spm_meta(**{K + "add_eos_token": True,
                                                         K + "padding_token_id": 0}))
    assert tok.encode("hello", add_special=True) == [1, _sid("\u2581hello"), 2]
    assert tok.pad_id == 0 and tok.eos_ids == (2,) and not tok.is_eos(1)
    bpe = from_gguf_metadata(_tiny_bpe_meta(**{K + "eom_token_id": 266}))
    assert bpe.eos_ids == (264, 265, 266) and not bpe.add_bos
    assert bpe.encode("x", add_special=True) == [ord("x")]


# ---------------------------------------------------------------------- real tokenizers


def _id_pools(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """Ids worth over-sampling: byte pieces / multi-byte tokens, and unknown/control tokens."""
    step = max(1, tok.vocab_size // 20000)
    byte_like = [i for i in range(0, tok.vocab_size, step)
                 if tok.token_type(i) == 6 or any(b >= 0x80 for b in tok.id_to_bytes(i))]
    special = [i for i in range(tok.vocab_size) if tok.token_type(i) in (2, 3)][:300]
    return byte_like, special


def _random_ids(tok: Tokenizer, pools, rng: random.Random, n: int) -> list[int]:
    byte_like, special = pools
    out = []
    for _ in range(n):
        r = rng.random()
        pool = byte_like if r < 0.5 else special if r < 0.6 and special else None
        out.append(rng.choice(pool) if pool else rng.randrange(tok.vocab_size))
    return out


@pytest.mark.parametrize("kind", ["spm", "tiktoken", "bpe"])
def test_decode_encode_is_lossless(kind):
    tok = _real(kind)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, text
        assert tok.decode(tok.encode(text, add_special=True)) == text


@pytest.mark.parametrize("kind,special", [
    ("tiktoken", "<|eot_id|>"), ("bpe", "<|endoftext|>"), ("spm", "</s>"),
])
def test_special_tokens_parsed_only_when_asked(kind, special):
    tok = _real(kind)
    tid = tok.piece_to_id(special)
    plain = tok.encode(f"Hi{special}")
    assert tid not in plain and len(plain) > 2
    assert tok.decode(plain) == f"Hi{special}"
    parsed = tok.encode(f"Hi{special}", parse_special=True)
    assert parsed[-1] == tid and tid not in parsed[:-1]
    assert tok.decode(parsed) == "Hi" and tok.decode(parsed, skip_special=False) == f"Hi{special}"


def test_special_ids_of_the_three_vocabularies():
    llama2, llama3, gpt2 = _real("spm"), _real("tiktoken"), _real("bpe")
    assert (llama2.bos_id, llama2.eos_ids, llama2.unk_id, llama2.vocab_size) == (1, (2,), 0, 32000)
    assert (llama3.bos_id, llama3.eos_ids, llama3.vocab_size) == (128000, (128001, 128009), 128256)
    assert (gpt2.bos_id, gpt2.eos_ids, gpt2.vocab_size) == (50256, (50256,), 50257)
    assert llama2.encode("Hi", add_special=True)[0] == 1
    assert llama3.encode("Hi", add_special=True)[0] == 128000
    assert gpt2.encode("Hi", add_special=True) == gpt2.encode("Hi")  # GPT-2 adds no BOS


def test_pieces_and_bytes_for_display():
    llama2, llama3 = _real("spm"), _real("tiktoken")
    assert llama2.token_to_piece(15043) == " Hello" and llama2.id_to_bytes(15043) == b" Hello"
    assert llama2.token_to_piece(3 + 0xE2) == "<0xE2>" and llama2.id_to_bytes(3 + 0xE2) == b"\xe2"
    assert llama2.token_to_piece(1) == "<s>"
    eacute = llama3.encode("é")
    assert b"".join(llama3.id_to_bytes(i) for i in eacute) == "é".encode()
    partial = [i for i in llama3.encode("🦙")
               if not llama3.id_to_bytes(i).decode("utf-8", "ignore")]
    assert partial and llama3.token_to_piece(partial[0]).startswith("<0x")


@pytest.mark.parametrize("kind", ["spm", "tiktoken", "bpe"])
def test_decode_matches_the_wrapped_library(kind):
    tok = _real(kind)
    lib = tok._backend
    rng = random.Random(7)
    pools = _id_pools(tok)
    for _ in range(400):
        ids = _random_ids(tok, pools, rng, rng.randrange(12))
        if kind == "spm":
            expected = lib.decode(ids)
        elif kind == "tiktoken":
            expected = lib.decode([i for i in ids if tok.token_type(i) != 3], errors="replace")
        else:
            expected = lib.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == expected, ids


# ---------------------------------------------------------------------- streaming decode


def _stream(tok: Tokenizer, ids, skip_special=True) -> list[str]:
    dec = IncrementalDecoder(tok, skip_special=skip_special)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("kind", ["spm", "tiktoken", "bpe", "tiny-spm", "tiny-bpe"])
def test_incremental_decoder_equals_decode_on_random_ids(kind):
    if kind.startswith("tiny"):
        meta = _tiny_spm_meta() if kind == "tiny-spm" else _tiny_bpe_meta()
        tok = from_gguf_metadata(meta)
    else:
        tok = _real(kind)
    rng = random.Random(len(kind))
    pools = _id_pools(tok)
    for _ in range(300):
        ids = _random_ids(tok, pools, rng, rng.randrange(0, 16))
        for skip in (True, False):
            assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special=skip), ids


@pytest.mark.parametrize("kind", ["spm", "tiktoken", "bpe"])
def test_incremental_decoder_never_emits_partial_characters(kind):
    tok = _real(kind)
    for text in TEXTS:
        ids = tok.encode(text, add_special=True)
        chunks = _stream(tok, ids)
        assert "".join(chunks) == text
        assert not any("\ufffd" in c for c in chunks)
    # a 4-byte emoji split over byte tokens: nothing until its last byte arrives
    ids = tok.encode("🦙")
    chunks = _stream(tok, ids)
    assert all(c == "" for c in chunks[:-2]) and "🦙" in chunks[-2]


def test_incremental_decoder_flushes_incomplete_bytes_and_restarts():
    tok = from_gguf_metadata(_tiny_spm_meta())
    dec = IncrementalDecoder(tok)
    assert dec.push(3 + 0xE2) == "" and dec.push(3 + 0x82) == ""
    assert dec.flush() == "\ufffd\ufffd" == tok.decode([3 + 0xE2, 3 + 0x82])
    assert dec.push(_sid("\u2581hello")) == "hello"  # a new text: dummy prefix dropped again


# ---------------------------------------------------------------------- chat templates


def test_bitnet_fallback_chat_format():
    llama3 = _real("tiktoken")
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert llama3.apply_chat_template(messages) == (
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: Hello!<|eot_id|>"
        "User: Bye<|eot_id|>Assistant: "
    )
    no_prompt = llama3.apply_chat_template(messages[:2], add_generation_prompt=False)
    assert no_prompt.endswith("Hi<|eot_id|>")
    # no <|begin_of_text|> / <|eot_id|> in the vocabulary: no begin marker, EOS text ends turns
    assert _real("spm").apply_chat_template(messages[1:2]) == "User: Hi</s>Assistant: "
    with pytest.raises(TokenizerError, match="role 'tool'"):
        llama3.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        llama3.apply_chat_template([{"content": "x"}])


def test_jinja_template_from_gguf_metadata():
    meta = _tiny_bpe_meta(**{"tokenizer.chat_template": BITNET_TEMPLATE})
    tok = from_gguf_metadata(meta)
    out = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert out == "<|endoftext|>User: Hi<|eot_id|>Assistant: "
    with pytest.raises(TokenizerError, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    dated = from_gguf_metadata(_tiny_bpe_meta(**{
        "tokenizer.chat_template": "{{ strftime_now('%Y') }}|{{ messages | tojson }}"}))
    year, dumped = dated.apply_chat_template([{"role": "user", "content": "é"}]).split("|", 1)
    assert len(year) == 4 and "é" in dumped
    assert json.loads(dumped) == [{"role": "user", "content": "é"}]
    sandboxed = from_gguf_metadata(_tiny_bpe_meta(**{
        "tokenizer.chat_template": "{{ messages.append(1) }}"}))
    with pytest.raises(TokenizerError):
        sandboxed.apply_chat_template([{"role": "user", "content": "x"}])


def test_bitnet_gguf_placeholder_template_is_replaced():
    placeholder = ("{% for m in messages %}Human: {{ m['content'] }}\n\n"
                   "BITNETAssistant: {% endfor %}")
    meta = _tiny_bpe_meta(**{"tokenizer.chat_template": placeholder})
    tok = from_gguf_metadata(meta)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "User: Hi<|eot_id|>Assistant: "


# ---------------------------------------------------------------------- HF folders


def test_hf_tokenizer_json_folder(tmp_path):
    tiny = from_gguf_metadata(_tiny_bpe_meta())
    tiny._backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": {"content": "<|eot_id|>"},
        "add_bos_token": True, "chat_template": BITNET_TEMPLATE}))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "bpe" and tok.pre == "gpt-2" and tok.vocab_size == 267
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (264, 265, True)
    for text in TEXTS:
        assert tok.encode(text, add_special=True) == [264] + tiny.encode(text)
        assert tok.encode(text, parse_special=True) == tiny.encode(text, parse_special=True)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|endoftext|>User")
    again = from_gguf_metadata(to_gguf_metadata(tok))
    assert again.encode(TEXTS[8]) == tok.encode(TEXTS[8]) and again.add_bos


def test_sentencepiece_folder_with_added_tokens(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(_shared(LLAMA2))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<pad>": 32000, "</line>": 32001}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 32002 and tok.pad_id == 32000
    assert 32001 in tok.encode("a</line>b")  # user-defined: always one token
    assert 32000 not in tok.encode("a<pad>b") and 32000 in tok.encode("a<pad>b", parse_special=True)
    assert tok.encode("Hello world") == [15043, 3186]
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<pad>": 32005}))
    with pytest.raises(TokenizerError, match="without gaps"):
        load_tokenizer(tmp_path)


def test_tiktoken_folder_with_hf_side_files(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(_shared(LLAMA3))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": BITNET_TEMPLATE}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "tiktoken" and tok.eos_id == 128009 and tok.eos_ids == (128001, 128009)
    prompt = tok.apply_chat_template([{"role": "user", "content": "How are you?"}])
    assert prompt == "<|begin_of_text|>User: How are you?<|eot_id|>Assistant: "
    assert tok.encode(prompt, parse_special=True) == [128000, 1502, 25, 2650, 527, 499, 30, 128009,
                                                      72803, 25, 220]


def test_file_inside_folder_uses_side_files(tmp_path):
    (tmp_path / "vocab.json").symlink_to(_shared(GPT2))
    (tmp_path / "merges.txt").symlink_to(_shared("gpt2/merges.txt"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'X' }}"}))
    for path in (tmp_path, tmp_path / "vocab.json", tmp_path / "merges.txt"):
        tok = load_tokenizer(path)
        assert tok.encode("Hello world") == [15496, 995] and tok.chat_template == "{{ 'X' }}"


def test_load_tokenizer_reads_gguf_files_and_gguf_folders(tmp_path):
    gguf = _shared("ggml-vocab-llama-spm.gguf", SHARED / "llama-vocab")
    hello = [15043, 3186]
    tok = load_tokenizer(gguf)
    assert tok.kind == "spm" and tok.vocab_size == 32000 and tok.encode("Hello world") == hello
    (tmp_path / "model.gguf").symlink_to(gguf)
    assert load_tokenizer(tmp_path).encode("Hello world") == hello  # a folder with one .gguf
    # The tokenizer package reads tokenizer files only and says where GGUF is read.
    for path in (gguf, tmp_path):
        with pytest.raises(TokenizerError, match="with bitnet_jax.load_tokenizer, which"):
            load_tokenizer_files(path)
    # Tokenizer files beside the .gguf win, as they always did.
    from_gguf_metadata(_tiny_bpe_meta())._backend.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).vocab_size == 267
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "second.gguf").symlink_to(gguf)
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)  # two GGUFs: which one is meant is unknown


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("meta,match", [
    ({}, "no tokenizer.ggml.model"),
    ({K + "model": "wordsmith", K + "tokens": ["a"]}, "unknown tokenizer model 'wordsmith'"),
    ({K + "model": "bert", K + "tokens": ["a"]}, "WordPiece"),
    ({K + "model": "gpt2", K + "tokens": ["a", "b"]}, "no tokenizer.ggml.merges"),
    ({K + "model": "gpt2", K + "tokens": ["a"], K + "merges": [], K + "pre": "klingon"},
     "unknown pre-tokenizer 'klingon'"),
    ({K + "model": "gpt2", K + "tokens": ["a"], K + "merges": [], K + "pre": "kimi-k2"}, "custom"),
    ({K + "model": "gpt2", K + "tokens": ["a", "b"], K + "merges": ["a c"]}, "merges do not match"),
    ({K + "model": "gpt2", K + "tokens": ["a", "b"], K + "merges": ["ab"]}, "no space"),
    ({K + "model": "llama"}, "no tokenizer.ggml.tokens"),
    ({K + "model": "llama", K + "tokens": ["a", "a", "b"], K + "unknown_token_id": 2},
     "sentencepiece rejected"),
    ({K + "model": "llama", K + "tokens": ["<unk>", "a"], K + "scores": [0.0]}, "scores has 1"),
])
def test_bad_gguf_metadata_raises_one_sentence(meta, match):
    with pytest.raises(TokenizerError, match=match) as info:
        from_gguf_metadata(meta)
    assert isinstance(info.value, BitNetError) and "\n" not in str(info.value)


def test_decode_rejects_ids_outside_the_vocabulary():
    tok = from_gguf_metadata(_tiny_bpe_meta())
    for ids in ([1, 267], [-1], ["x"]):
        with pytest.raises(TokenizerError):
            tok.decode(ids)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        IncrementalDecoder(tok).push(10_000)
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"bytes")


# Python's escapes for bytes that are not UTF-8 (sys.argv gives "\udcff" for the byte 0xFF) and a
# lone high surrogate: no UTF-8 encoding exists for them.
NOT_UTF8 = ["\udcff", "a\udcffb", "caf\udce9 au lait", "x\ud83d", "<|eot_id|>\udcc3"]


@pytest.mark.parametrize("kind", ["spm", "bpe", "tiktoken", "tiny-spm", "tiny-bpe"])
def test_text_that_is_not_utf8_raises_one_line_tokenizer_error(kind):
    tok = _any(kind)
    for text in NOT_UTF8:
        for parse_special in (False, True):
            with pytest.raises(TokenizerError, match="is not valid UTF-8") as info:
                tok.encode(text, add_special=True, parse_special=parse_special)
            message = str(info.value)
            assert "\n" not in message and "U+D" in message and "decoded as UTF-8" in message
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\udcffb"}]
    with pytest.raises(TokenizerError, match="content of chat message 1 is not valid UTF-8"):
        tok.apply_chat_template(messages)
    # The fix the message names: decode the bytes as UTF-8 (here with replacement).
    fixed = "a\udcffb".encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    assert tok.decode(tok.encode(fixed)) == "a\ufffdb"


def test_bad_paths_raise_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(junk)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(TokenizerError, match="no merges.txt"):
        load_tokenizer(tmp_path / "vocab.json")
    odd = tmp_path / "odd.model"
    odd.write_text("YWJj 0\nZGVm 1\n")
    with pytest.raises(TokenizerError, match="tiktoken vocabulary of 2 ranks"):
        load_tokenizer(odd)
    wordpiece = tmp_path / "wp" / "tokenizer.json"
    wordpiece.parent.mkdir()
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(TokenizerError, match="WordPiece"):
        load_tokenizer(wordpiece)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(TokenizerError, match="cannot read GGUF"):
        load_tokenizer(gguf)


def test_to_gguf_refuses_what_gguf_cannot_hold(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    hf = HFTokenizer(models.BPE(vocab={"<unk>": 0, "\u2581": 1, "a": 2, "\u2581a": 3},
                                merges=[("\u2581", "a")], unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("a a") == [3, 3] and tok.decode([3, 3]) == "a a"
    with pytest.raises(TokenizerError, match="SentencePiece-style or Unigram tokenizer.json"):
        to_gguf_metadata(tok)


def test_every_pre_tokenizer_regex_compiles():
    from tokenizers import Regex

    for name, family in PRE_TOKENIZERS.items():
        for regex in family.regexes:
            Regex(regex)  # raises on syntax the Oniguruma engine rejects
        meta = _tiny_bpe_meta(**{K + "pre": name})
        tok = from_gguf_metadata(meta)
        assert tok.decode(tok.encode(TEXTS[7])) == TEXTS[7], name


# ---------------------------------------------------------------------- CLI


def test_tokenize_cli_prints_ids_and_pieces(capsys):
    path = str(_shared(LLAMA2))
    assert tokenize_main(["--model", path, "--text", "Hello world", "--verbose"]) == 0
    assert capsys.readouterr().out == "15043 3186\n15043\t' Hello'\n3186\t' world'\n"
    argv = ["--model", path, "--text", "</s>", "--add-special", "--parse-special"]
    assert tokenize_main(argv) == 0
    assert capsys.readouterr().out == "1 2\n"


def test_tokenize_cli_reads_gguf(capsys):
    path = str(_shared("ggml-vocab-llama-spm.gguf", SHARED / "llama-vocab"))
    assert tokenize_main(["--model", path, "--text", "Hello world"]) == 0
    assert capsys.readouterr().out == "15043 3186\n"


def test_tokenize_cli_bad_model_raises(tmp_path):
    with pytest.raises(TokenizerError):
        tokenize_main(["--model", str(tmp_path / "nope"), "--text", "x"])


# ---------------------------------------------------------------------- package structure

# Each module of bitnet_jax/tokenizer may import only modules of a lower layer (issue 12): core
# knows nothing of the backends, files, GGUF metadata or paths, and nothing imports upward.
LAYERS = {"_pretok": 0, "_decode": 1, "_chat": 2, "_core": 3, "_backends": 4, "_files": 5,
          "_gguf": 5, "_load": 6, "__init__": 7}


def _own_imports(path: Path, module: str) -> list[tuple[str, ast.stmt, bool]]:
    """(imported bitnet_jax module, statement, at module top level) for every import statement
    in the file, TYPE_CHECKING blocks and function bodies included. `from pkg import name` counts
    as importing `pkg` and, when `name` is a module file, `pkg.name` too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    root = Path(bitnet_jax.__file__).parent.parent
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base]
            for alias in node.names:
                sub = root.joinpath(*f"{base}.{alias.name}".split("."))
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    names.append(f"{base}.{alias.name}")
        else:
            continue
        out.extend((n, node, id(node) in top) for n in names
                   if n == "bitnet_jax" or n.startswith("bitnet_jax."))
    return out


def test_tokenizer_package_imports_are_one_way():
    folder = Path(bitnet_jax.tokenizer.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert {f.stem for f in files} == set(LAYERS), "a new tokenizer module needs a layer here"
    for path in files:
        module = f"bitnet_jax.tokenizer.{path.stem}".removesuffix(".__init__")
        for name, node, at_top in _own_imports(path, module):
            where = f"{path.name}:{node.lineno} imports {name}"
            assert at_top, f"{where} inside a function or an if/try block (TYPE_CHECKING too)"
            if name == "bitnet_jax.errors":
                continue
            assert name.startswith("bitnet_jax.tokenizer."), f"{where}: outside the package"
            target = name.rsplit(".", 1)[1]
            assert LAYERS[target] < LAYERS[path.stem], f"{where}: an import upward or sideways"
    # formats imports the tokenizer package, never the reverse.
    formats = Path(bitnet_jax.__file__).parent / "formats" / "tokenizer.py"
    imported = {n for n, _, _ in _own_imports(formats, "bitnet_jax.formats.tokenizer")}
    assert "bitnet_jax.tokenizer" in imported


def test_public_names_of_the_tokenizer_package():
    assert set(bitnet_jax.tokenizer.__all__) == {
        "IncrementalDecoder", "TOKENIZER_FILES", "Tokenizer", "from_gguf_metadata",
        "load_tokenizer_files", "to_gguf_metadata"}
    assert not hasattr(Tokenizer, "from_gguf_metadata") and not hasattr(Tokenizer, "to_gguf_metadata")
    formats = importlib.import_module("bitnet_jax.formats.tokenizer")
    assert bitnet_jax.load_tokenizer is formats.load_tokenizer
    doc = IncrementalDecoder.__doc__
    assert "push(token_id) -> str" in doc and "half" in doc and "flush() -> str" in doc
