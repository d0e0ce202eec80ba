"""Attention: masks, GQA head mapping, sub-norm, KV cache layout (bitnet_jax/attention.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import kernels
from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.model.attention import attend, attention, cached_attention
from bitnet_jax.model.cache import attention_mask, init_cache, quantize_rows, widen, write
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.layers import rope_frequencies
from bitnet_jax.model.params import layer
from bitnet_jax.model.policy import Policy
from conftest import LEAF_TOL, kernel_path, kernel_paths, random_cache
from test_layers import np_rms_norm, np_rope_half

F32 = Policy()
jit_attention = jax.jit(lambda *a: attention(*a)[0], static_argnums=(5, 6))


def test_causal_mask_literal():
    mask = attention_mask(jnp.asarray([0]), 4, 4)
    assert np.asarray(mask, int).tolist() == [[[1, 0, 0, 0],
                                               [1, 1, 0, 0],
                                               [1, 1, 1, 0],
                                               [1, 1, 1, 1]]]


def test_ragged_rows_mask_literal():
    # Every slot's sequence starts at position 0; row 1 is two tokens further along than row 0.
    mask = attention_mask(jnp.asarray([0, 2]), 2, 5)
    assert np.asarray(mask, int).tolist() == [[[1, 0, 0, 0, 0],
                                               [1, 1, 0, 0, 0]],
                                              [[1, 1, 1, 0, 0],
                                               [1, 1, 1, 1, 0]]]


def test_decode_mask_literal():
    # Two new tokens at positions 3 and 4 of a 6-position cache row.
    mask = attention_mask(jnp.asarray([3]), 2, 6)
    assert np.asarray(mask, int).tolist() == [[[1, 1, 1, 1, 0, 0],
                                               [1, 1, 1, 1, 1, 0]]]


def test_init_cache_layout(tiny_cfg):
    cache = init_cache(tiny_cfg, batch=3, length=11, dtype=jnp.bfloat16)
    assert set(cache) == {"k", "v"}
    assert cache["k"].shape == (2, 3, 2, 11, 8) and cache["v"].dtype == jnp.bfloat16  # [L,B,K,S,H]
    assert not np.asarray(cache["k"], np.float32).any()


def test_int8_cache_rows_round_trip(tiny_cfg, rng):
    # An int8 cache row is H codes of the row's absmax and its float32 scale (model/cache.py):
    # read back within half a step of the scale, all-zero rows exact, a non-finite row
    # non-finite.
    cache = init_cache(tiny_cfg, batch=3, length=11, dtype=jnp.int8)
    assert cache["k"].shape == (2, 3, 2, 11, 8 + 4) and cache["k"].dtype == jnp.int8
    assert not np.asarray(widen(cache["v"], jnp.float32)).any()
    x = rng.normal(size=(5, 7, 96)) * np.logspace(-3, 3, 7)[None, :, None]
    x[0, 0] = 0.0
    rows = quantize_rows(jnp.asarray(x, jnp.float32))
    assert rows.shape == (5, 7, 100) and rows.dtype == jnp.int8
    back = np.asarray(widen(rows, jnp.float32))
    step = np.abs(x).max(-1, keepdims=True) / 127
    assert np.all(np.abs(back - x) <= step * 0.5 + 1e-6 * np.abs(x))
    assert np.abs(np.asarray(rows[..., :96])).max() == 127 and not back[0, 0].any()
    x[1, 2, 5] = np.nan
    x[2, 3, 0] = np.inf
    back = np.asarray(widen(quantize_rows(jnp.asarray(x, jnp.float32)), jnp.float32))
    assert not np.isfinite(back[1, 2]).any() and not np.isfinite(back[2, 3]).any()
    assert np.isfinite(np.delete(back.reshape(35, 96), [9, 17], axis=0)).all()


@pytest.mark.parametrize("h", [1, 8, 13, 96, 100, 128])
def test_int8_rows_cpu_kernel_matches_xla(h, rng):
    # kernels.quantize_kv (kv_quantize_cpu.h) writes quantize_rows' bytes: the same codes (ties
    # at k + 0.5 rounded to even: amax 127 makes 127 / amax exactly 1) and scales, zero rows,
    # rows with a NaN or an inf, on the SIMD path and the portable one.
    if jax.default_backend() != "cpu" or not cpu_ffi.available():
        pytest.skip(f"CPU FFI extension not available: {cpu_ffi.unavailable_reason()}")
    x = rng.normal(size=(2, 3, 7, h)) * np.logspace(-4, 4, 7)[None, None, :, None]
    x[0, 0, 0] = 0.0
    x[0, 1, 0] = np.arange(h) % 9 - 4.5  # ties after the scaling below
    x[0, 1, 0, 0] = 127.0
    x[1, 0, 1, h // 2] = np.nan
    x[1, 1, 2, 0] = -np.inf
    k, v = jnp.asarray(x, jnp.float32), jnp.asarray(-x[::-1] * 3, jnp.float32)
    want = [np.asarray(quantize_rows(a)) for a in (k, v)]
    for isa in kernel_paths(all_paths=False):
        with kernel_path(isa):
            got = jax.jit(kernels.quantize_kv)(k, v)
            for g, w in zip(got, want):
                assert g.dtype == jnp.int8 and g.shape == (2, 3, 7, h + 4)
                np.testing.assert_array_equal(np.asarray(g), w, err_msg=isa)


def test_int8_decode_write_drops_positions_past_the_cache(tiny_cfg, rng):
    # The int8 cache's decode write (one dynamic_update_slice per row, model/cache._put_rows):
    # each row's new key at its own position, the other positions and layers untouched, and a
    # position past S dropped (a clamped slice would overwrite the last position).
    cfg = tiny_cfg
    shape = (cfg.num_hidden_layers, 3, cfg.num_key_value_heads, 6, cfg.head_dim)
    cache = {"k": random_cache(rng, shape, "int8"), "v": random_cache(rng, shape, "int8")}
    new = jnp.asarray(rng.normal(size=(3, cfg.num_key_value_heads, 1, cfg.head_dim)), jnp.float32)
    pos = jnp.asarray([2, 6, 5], jnp.int32)
    got = jax.jit(write)(cache, new, -new, jnp.int32(1), pos)
    for name, rows in (("k", quantize_rows(new)), ("v", quantize_rows(-new))):
        want = np.array(cache[name])
        want[1, 0, :, 2] = rows[0, :, 0]
        want[1, 2, :, 5] = rows[2, :, 0]
        np.testing.assert_array_equal(np.asarray(got[name]), want)


def np_attention(p, x, positions, cfg, kv_map="repeat"):
    """Float reference of one attention block (spec §1.2): q head j reads kv head j // G."""
    b, t, _ = x.shape
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    w = {name: np.asarray(p[name], np.float64) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = np_rope_half((x @ w["q_proj"].T).reshape(b, t, n, h), positions, cfg.rope_theta)
    kk = np_rope_half((x @ w["k_proj"].T).reshape(b, t, k, h), positions, cfg.rope_theta)
    v = (x @ w["v_proj"].T).reshape(b, t, k, h)
    if kv_map == "repeat":  # HF repeat_kv: [kv0, kv0, kv1, kv1] for G = 2
        kk, v = np.repeat(kk, n // k, axis=2), np.repeat(v, n // k, axis=2)
    else:  # the wrong mapping j % K, to show the test can tell them apart
        kk, v = np.tile(kk, (1, 1, n // k, 1)), np.tile(v, (1, 1, n // k, 1))
    scores = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, n * h)
    if cfg.use_sub_norms:
        out = np_rms_norm(out, np.asarray(p["attn_sub_norm"], np.float64), cfg.rms_norm_eps)
    return out @ w["o_proj"].T


@pytest.mark.parametrize("sub_norms", [False, True])
def test_gqa_attention_matches_numpy(tiny_cfg, tiny_float_params, tiny_params, rng, sub_norms):
    # Unquantised projections so the comparison is a sharp float one (no int8 steps).
    if sub_norms:
        cfg, params = tiny_cfg.replace(quant_method=None), tiny_params
    else:
        cfg = tiny_cfg.replace(quant_method=None, use_sub_norms=False)
        params = tiny_float_params
    assert cfg.num_groups == 2
    p = layer(params, 1)["self_attn"]
    x = rng.normal(size=(3, 7, 32)).astype(np.float32)
    positions = np.broadcast_to(np.arange(7), (3, 7))
    cos, sin = rope_frequencies(jnp.asarray(positions), cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(jnp.zeros((3,), jnp.int32), 7, 7)
    y = jit_attention(p, jnp.asarray(x), cos, sin, mask, cfg, F32)
    assert y.shape == (3, 7, 32) and y.dtype == jnp.float32
    want = np_attention(p, x.astype(np.float64), positions, cfg)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=LEAF_TOL)
    wrong = np_attention(p, x.astype(np.float64), positions, cfg, kv_map="tile")
    assert np.abs(want - wrong).max() > 100 * LEAF_TOL


def test_attention_returns_the_cache_it_wrote(tiny_cfg, tiny_params, rng):
    # With a cache, attention writes this call's keys/values into layer `layer` at the cursor and
    # returns the new cache; attending over exactly those keys gives the uncached result.
    cfg = tiny_cfg
    p = layer(tiny_params, 0)["self_attn"]
    x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    cos, sin = rope_frequencies(positions, cfg.head_dim, cfg.rope_theta)
    mask = attention_mask(jnp.zeros((2,), jnp.int32), 5, 5)
    cache = init_cache(cfg, batch=2, length=5)
    xla = F32.replace(kernel="xla")

    @jax.jit
    def cached(p, x, cache):
        return attention(p, x, cos, sin, mask, cfg, xla, cache, layer=jnp.int32(1),
                         pos=jnp.zeros((2,), jnp.int32))

    y_cached, new = cached(p, x, cache)
    y, none = jax.jit(lambda p, x: attention(p, x, cos, sin, mask, cfg, xla))(p, x)
    assert none is None
    assert new["k"].shape == cache["k"].shape == (cfg.num_hidden_layers, 2, 2, 5, 8)
    assert float(jnp.abs(new["k"][1]).max()) > 0 and float(jnp.abs(new["v"][1]).max()) > 0
    assert float(jnp.abs(new["k"][0]).max()) == 0  # other layers untouched
    np.testing.assert_allclose(np.asarray(y_cached), np.asarray(y), rtol=1e-6, atol=1e-6)


# (heads N, kv heads K, head_dim H, query rows Bq, new tokens T, cache length S, positions,
# slot): decode steps of every slot at its own position and prefill chunks into one slot of a
# 3-slot cache, GQA and MHA, H not a multiple of 8 (1bitLLM 3B has H = 100), and writes that end
# at the last position.
ATTN_CASES = [
    (4, 2, 8, 2, 1, 16, (9, 3), None),
    (16, 16, 96, 1, 1, 64, (40,), None),
    (8, 2, 100, 3, 4, 32, (5, 20, 0), None),
    (4, 4, 128, 2, 6, 8, (2, 0), None),
    (6, 3, 12, 1, 3, 12, (9,), 2),
    (4, 2, 8, 1, 4, 11, (0,), 1),
    (4, 2, 8, 3, 1, 11, (6, 2, 10), None),
    (16, 4, 64, 1, 20, 40, (3,), 1),
]


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("n,k,h,b,t,s,pos,slot", ATTN_CASES)
def test_cached_attention_cpu_kernel_matches_xla(n, k, h, b, t, s, pos, slot, cache_dtype):
    # Both paths read the same (possibly 16-bit, or int8-row) cache values widened to float32.
    if jax.default_backend() != "cpu" or not cpu_ffi.available():
        pytest.skip(f"CPU FFI extension not available: {cpu_ffi.unavailable_reason()}")
    cfg = ModelConfig(hidden_size=n * h, intermediate_size=8, num_hidden_layers=3,
                      num_attention_heads=n, num_key_value_heads=k, vocab_size=8)
    rng = np.random.default_rng(n + k + h + t)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 2, jnp.float32)
    knew = jnp.asarray(rng.normal(size=(b, k, t, h)), jnp.float32)
    vnew = jnp.asarray(rng.normal(size=(b, k, t, h)), jnp.float32)
    rows = b if slot is None else 3
    cache = {"k": random_cache(rng, (3, rows, k, s, h), cache_dtype),
             "v": random_cache(rng, (3, rows, k, s, h), cache_dtype)}
    pos = jnp.asarray(pos, jnp.int32)
    mask = attention_mask(pos, t, s)
    slot = None if slot is None else jnp.int32(slot)

    def run(cache, layer, kernel):
        return cached_attention(q, knew, vnew, cache, layer, pos, slot, mask, cfg,
                                Policy(kernel=kernel))

    run = jax.jit(run, static_argnums=2)
    for isa in kernel_paths(all_paths=False):  # the SIMD path and the portable one
        with kernel_path(isa):
            for layer in (0, 2):
                out_x, cache_x = run(cache, jnp.int32(layer), "xla")
                out_f, cache_f = run(cache, jnp.int32(layer), "ffi")
                np.testing.assert_allclose(np.asarray(out_f), np.asarray(out_x), rtol=1e-5,
                                           atol=LEAF_TOL, err_msg=isa)
                for name in ("k", "v"):
                    np.testing.assert_array_equal(np.asarray(cache_f[name]),
                                                  np.asarray(cache_x[name]))
