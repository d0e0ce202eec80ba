"""Golden tokenizations: llama.cpp's tokenizer test vectors and published encode cases.

Data: ../shared/data/llama-vocab (llama.cpp vocab-only GGUFs + .inp/.out pairs, data README §1),
../shared/data/tokenizers (the original tokenizer files, §2) and ../shared/data/reference (§5).
Every test skips with a reason when that folder is absent. GGUFs are read once per session
(gguf's reader takes seconds on the 128256-token llama3 vocabulary).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from bitnet_jax.errors import TokenizerError
from bitnet_jax.formats.tokenizer import load_tokenizer, read_gguf_tokenizer_metadata
from bitnet_jax.tokenizer import Tokenizer, from_gguf_metadata, to_gguf_metadata

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = SHARED / "llama-vocab"
TOKENIZERS = SHARED / "tokenizers"
REFERENCE = SHARED / "reference"
# Every ggml-vocab-*.gguf.inp pair in the folder is checked (the three from the data README, and
# any further llama.cpp vocabularies dropped in); with the folder absent the three still show up,
# skipped.
VOCABS = tuple(sorted(
    p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in VOCAB.glob("ggml-vocab-*.gguf.inp")
)) or ("llama-spm", "llama-bpe", "gpt-2")
# llama.cpp tokenizer models refused with a clear error (WordPiece, Unigram, Gemma-4 BPE).
REFUSED_MODELS = {"bert", "t5", "gemma4"}
# The original tokenizer files each GGUF vocabulary was converted from.
ORIGINALS = {
    "llama-spm": ("llama2-spm/tokenizer.model",),
    "llama-bpe": ("llama3-tiktoken/tokenizer.model",),
    "gpt-2": ("gpt2/vocab.json", "gpt2/merges.txt", "gpt2/gpt2.tiktoken"),
}


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path} is missing")
    return path


@functools.cache
def _meta(vocab: str) -> dict:
    return read_gguf_tokenizer_metadata(_need(VOCAB / f"ggml-vocab-{vocab}.gguf"))


@functools.cache
def _gguf(vocab: str) -> Tokenizer:
    return from_gguf_metadata(_meta(vocab))


@functools.cache
def _file(rel: str) -> Tokenizer:
    return load_tokenizer(_need(TOKENIZERS / rel))


@functools.cache
def _cases(vocab: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(text, ids) pairs in llama.cpp's .inp/.out format (data README §1)."""
    inp = _need(VOCAB / f"ggml-vocab-{vocab}.gguf.inp").read_bytes().decode("utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    if texts[-1] == "":
        texts.pop()
    out = _need(VOCAB / f"ggml-vocab-{vocab}.gguf.out").read_bytes().decode("utf-8")
    lines = out.split("\n")
    assert len(lines) >= len(texts)
    return tuple((t, tuple(int(i) for i in line.split())) for t, line in zip(texts, lines))


@pytest.mark.parametrize("vocab", VOCABS)
def test_llama_cpp_vectors_exact(vocab):
    model = _meta(vocab).get("tokenizer.ggml.model")
    if model in REFUSED_MODELS:
        with pytest.raises(TokenizerError, match="not supported"):
            from_gguf_metadata(_meta(vocab))
        return
    tok = _gguf(vocab)
    cases = _cases(vocab)
    assert len(cases) >= 46
    wrong = [(text, tok.encode(text), list(ids))
             for text, ids in cases if tok.encode(text) != list(ids)]
    assert not wrong, f"{len(wrong)}/{len(cases)} differ, first: {wrong[0]!r}"


@pytest.mark.parametrize("vocab", ("llama-spm", "llama-bpe", "gpt-2"))
def test_llama_cpp_vectors_round_trip(vocab):
    # These vocabularies are lossless on the test strings (byte fallback / byte-level BPE).
    tok = _gguf(vocab)
    for text, ids in _cases(vocab):
        assert tok.decode(list(ids)) == text


@pytest.mark.parametrize("vocab,rel", [(v, r) for v, rels in ORIGINALS.items() for r in rels])
def test_original_files_match_gguf_vocab(vocab, rel):
    tok = _file(rel)
    assert tok.vocab_size == _gguf(vocab).vocab_size
    for text, ids in _cases(vocab):
        assert tok.encode(text) == list(ids), text


@pytest.mark.parametrize("vocab,rel,kind", [
    ("llama-spm", "llama2-spm/tokenizer.model", "spm"),
    ("gpt-2", "gpt2/vocab.json", "bpe"),
])
def test_to_gguf_metadata_reproduces_llama_cpp_file(vocab, rel, kind):
    # Our GGUF writer input equals what llama.cpp's converter stored for the same vocabulary.
    tok = _file(rel)
    assert tok.kind == kind
    ours, ref = to_gguf_metadata(tok), _meta(vocab)
    for key in ("model", "pre", "tokens", "token_type", "scores", "merges", "bos_token_id",
                "eos_token_id", "unknown_token_id"):
        key = "tokenizer.ggml." + key
        assert ours.get(key) == ref.get(key), key


def test_tiktoken_merges_equal_llama3_gguf_merges():
    tok = _file("llama3-tiktoken/tokenizer.model")
    meta = to_gguf_metadata(tok)
    ref = _meta("llama-bpe")
    assert meta["tokenizer.ggml.tokens"] == ref["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.token_type"] == ref["tokenizer.ggml.token_type"]
    assert len(meta["tokenizer.ggml.merges"]) == 280147
    assert meta["tokenizer.ggml.merges"] == ref["tokenizer.ggml.merges"]


@pytest.mark.parametrize("rel,vocab", [
    ("llama2-spm/tokenizer.model", "llama-spm"),
    ("llama3-tiktoken/tokenizer.model", "llama-bpe"),
    ("gpt2/vocab.json", "gpt-2"),
])
def test_gguf_metadata_round_trip_encodes_identically(rel, vocab):
    tok = _file(rel)
    again = from_gguf_metadata(to_gguf_metadata(tok))
    assert again.vocab_size == tok.vocab_size
    assert (again.bos_id, again.eos_ids, again.add_bos) == (tok.bos_id, tok.eos_ids, tok.add_bos)
    extra = ["<|eot_id|> <s></s> <|endoftext|>", "naïve café 東京 🦙\r\n\t x"]
    for text in [t for t, _ in _cases(vocab)] + extra:
        for parse in (False, True):
            expected = tok.encode(text, parse_special=parse)
            assert again.encode(text, parse_special=parse) == expected, text
        assert again.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_bitnet_gguf_without_pre_key_uses_llama3_split():
    meta = dict(_meta("llama-bpe"))
    del meta["tokenizer.ggml.pre"]  # bitnet.cpp's converter writes no pre key
    tok = from_gguf_metadata(meta)
    assert tok.pre == "llama-bpe"
    text = [t for t, _ in _cases("llama-bpe")][-1]
    assert tok.encode(text) == _gguf("llama-bpe").encode(text)


def test_llama2_reference_encodings_with_bos():
    data = json.loads(_need(REFERENCE / "llama2-spm_encode_cases.json").read_text())
    for tok in (_file("llama2-spm/tokenizer.model"), _gguf("llama-spm")):
        for case in data["cases"]:
            assert tok.encode(case["text"], add_special=True) == case["ids"], case["text"]


def test_llama3_reference_cases():
    data = json.loads(_need(REFERENCE / "llama3_encode_cases.json").read_text())
    tok = _file("llama3-tiktoken/tokenizer.model")
    for text, tid in data["special_tokens"].items():
        assert tok.piece_to_id(text) == tid
    encode, decode, chat = data["cases"]
    assert [tok.bos_id] + tok.encode(encode["text"]) + [tok.eos_id] == encode["ids"]
    assert tok.encode(encode["text"], add_special=True) == encode["ids"][:-1]  # llama3: BOS only
    assert tok.decode(decode["decode_ids"], skip_special=False) == decode["text"]
    assert tok.decode(decode["decode_ids"]) == encode["text"]
    msg = chat["llama3_chat_message"]
    prompt = f"<|start_header_id|>{msg['role']}<|end_header_id|>\n\n{msg['content']}<|eot_id|>"
    assert tok.encode(prompt, parse_special=True) == chat["ids"]


def test_bitnet_2b4t_reference_prompt():
    path = _need(REFERENCE / "bitnet-b1.58-2B-4T_transformers_expected.json")
    data = json.loads(path.read_text())
    gen, logits = data["test_model_generation"], data["test_model_logits"]
    for tok in (_file("llama3-tiktoken/tokenizer.model"), _gguf("llama-bpe")):
        prompt = tok.apply_chat_template(gen["chat_messages"], add_generation_prompt=True)
        assert prompt == gen["prompt_after_chat_template"]
        ids = gen["prompt_ids_without_extra_bos_checked_here_with_tiktoken"]
        assert tok.encode(prompt, parse_special=True) == ids
        # transformers adds its own BOS in front of the template's: the reference's double BOS.
        assert tok.encode(prompt, add_special=True, parse_special=True)[:2] == [128000, 128000]
        decoded = tok.decode(logits["input_ids"], skip_special=False)
        assert decoded == logits["input_text_decoded_with_llama3_tokenizer"]
        assert tok.is_eos(128009) and tok.is_eos(128001) and not tok.is_eos(128000)


def test_gguf_bpe_decode_matches_tokenizers_library():
    # Our byte-table decode against HF tokenizers' own ByteLevel decoder on the llama3 vocabulary.
    import random

    tok = _gguf("llama-bpe")
    rng = random.Random(3)
    multibyte = [i for i in range(0, 128000, 7) if any(b >= 0x80 for b in tok.id_to_bytes(i))]
    for _ in range(300):
        ids = [rng.choice(multibyte) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randrange(1, 10))]
        assert tok.decode(ids) == tok._backend.decode(ids, skip_special_tokens=True)
