"""Golden outputs: karpathy's stories260K (llama2.c) reproduced through bitnet_jax.formats.llama2c.

shared/data README §3: a float Llama (D=64 F=172 L=5 N=8 K=4 V=512) in llama2.c's v0 format,
with BOS + 200 greedy ids, the logits at positions 0..7 of that run, and llama2.c's own printed
text for `run -t 0.0 -n 200` (its test_all.py `expected_stdout`).
"""

from __future__ import annotations

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import forward, load_model
from bitnet_jax.model.cache import init_cache
from bitnet_jax.errors import CheckpointError
from bitnet_jax.formats.llama2c import is_llama2c, load_llama2c, read_llama2c
from bitnet_jax.model.transformer import apply, unembed
from conftest import MODEL_TOL, require_shared

STORIES = ("models", "stories260K")
BOS = 1


@pytest.fixture(scope="module")
def stories():
    folder = require_shared(*STORIES)
    cfg, params = load_llama2c(folder / "stories260K.bin")
    return folder, cfg, params


def _greedy_with_cache(params, cfg, first: int, n: int, cache_len: int):
    """n greedy steps from `first`, one token per step through the KV cache, in one jit.

    Returns (ids [n] int32, logits [n, V] float32): step i reads the token at position i.
    """

    @jax.jit
    def run(params):
        def step(carry, pos):
            token, cache = carry
            h, cache = apply(params, token.reshape(1, 1), cfg, cache=cache, pos=pos[None])
            logits = unembed(params, h, cfg)[0, 0]
            nxt = jnp.argmax(logits).astype(jnp.int32)
            return (nxt, cache), (nxt, logits)

        init = (jnp.int32(first), init_cache(cfg, 1, cache_len))
        _, (ids, logits) = jax.lax.scan(step, init, jnp.arange(n, dtype=jnp.int32))
        return ids, logits

    return run(params)


def _decode_llama2c(tok_path, ids):
    """run.c's decode: strip the space after BOS, map <0xXX> pieces to bytes."""
    data = tok_path.read_bytes()
    offset = 4  # int32 max_token_length, then per token: f32 score, i32 length, bytes
    pieces = []
    while offset < len(data):
        _score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        pieces.append(data[offset:offset + length])
        offset += length
    out, prev = b"", BOS
    for i in ids:
        piece = pieces[i]
        if prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            piece = bytes([int(piece[3:5], 16)])
        out += piece
        prev = i
    return out.decode("utf-8")


def test_stories260k_header_and_rope_tables(stories):
    folder, cfg, params = stories
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 8)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (512, 512)
    assert cfg.tie_word_embeddings and not cfg.quantized and cfg.hidden_act == "silu"
    assert params["layers"]["self_attn"]["k_proj"].shape == (5, 32, 64)
    # The file's own RoPE tables confirm θ = 10000 over head_dim 8 (what the config assumes).
    _, raw = read_llama2c(folder / "stories260K.bin")
    inv = cfg.rope_theta ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    angles = np.arange(512)[:, None] * inv
    np.testing.assert_allclose(raw["freq_cis_real"], np.cos(angles), atol=1e-4)
    np.testing.assert_allclose(raw["freq_cis_imag"], np.sin(angles), atol=1e-4)


def test_stories260k_greedy_200_and_logits(stories):
    folder, cfg, params = stories
    want = [int(t) for t in (folder / "expected_greedy_n200_ids.txt").read_text().split()]
    ref_logits = np.load(folder / "ref_logits_first8.npy")
    assert want[0] == BOS and len(want) == 201
    ids, logits = _greedy_with_cache(params, cfg, BOS, 200, cache_len=256)
    assert [BOS] + np.asarray(ids).tolist() == want
    np.testing.assert_allclose(np.asarray(logits[:8]), ref_logits, rtol=0, atol=MODEL_TOL)
    # The cache-free full forward agrees on the same positions.
    full = forward(params, jnp.asarray([want[:8]]), cfg)[0]
    np.testing.assert_allclose(np.asarray(full), ref_logits, rtol=0, atol=MODEL_TOL)
    # And the ids spell llama2.c's own printed story byte for byte.
    text = (folder / "expected_greedy_n200.txt").read_text()
    assert _decode_llama2c(folder / "tok512.bin", want[1:]) == text


# ---- the converter on synthetic files (no shared data needed) ----------------------------------


def _write_v0(path, dim=8, hidden=12, layers=1, heads=2, kv_heads=1, vocab=-5, seq=4, seed=0):
    hd = dim // heads
    n = (abs(vocab) * dim + layers * dim + layers * dim * dim + 2 * layers * kv_heads * hd * dim
         + layers * dim * dim + layers * dim + 3 * layers * hidden * dim + dim + seq * hd
         + (abs(vocab) * dim if vocab < 0 else 0))
    floats = np.random.default_rng(seed).standard_normal(n).astype("<f4")
    path.write_bytes(np.asarray([dim, hidden, layers, heads, kv_heads, vocab, seq], "<i4")
                     .tobytes() + floats.tobytes())
    return floats


def test_llama2c_unshared_classifier_and_layout(tmp_path):
    path = tmp_path / "tiny.bin"
    floats = _write_v0(path)
    cfg, params = load_llama2c(path)
    assert not cfg.tie_word_embeddings and cfg.vocab_size == 5
    np.testing.assert_array_equal(np.asarray(params["embed_tokens"]).ravel(), floats[:40])
    np.testing.assert_array_equal(np.asarray(params["lm_head"]).ravel(), floats[-40:])
    # wq follows rms_att; its rows come back permuted to rotate-half order within each head.
    wq = floats[48:112].reshape(8, 8)
    np.testing.assert_array_equal(np.asarray(params["layers"]["self_attn"]["q_proj"][0]),
                                  wq[[0, 2, 1, 3, 4, 6, 5, 7]])
    assert forward(params, jnp.asarray([[1, 2, 3]]), cfg).shape == (1, 3, 5)
    # load_model recognises a llama2.c .bin by its header (it is not a pickle).
    assert is_llama2c(path)
    model = load_model(path)
    assert model.config == cfg and model.tokenizer is None
    np.testing.assert_array_equal(np.asarray(model.params["lm_head"]),
                                  np.asarray(params["lm_head"]))


def test_llama2c_errors(tmp_path):
    path = tmp_path / "tiny.bin"
    _write_v0(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_llama2c(path)
    assert not is_llama2c(path)
    with pytest.raises(CheckpointError, match="pickled"):  # so load_model refuses it
        load_model(path)
    path.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + b"\0" * 248)
    with pytest.raises(CheckpointError, match="version 0|v0"):
        load_llama2c(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_llama2c(tmp_path / "missing.bin")
