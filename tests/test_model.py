"""The decoder as pure functions (bitnet_jax/model.py, params.py) on the tiny config.

Sizes: V=61 D=32 F=48 N=4 K=2 H=8 L=2; batches B=3, T=7 against a cache of S=11.

Every comparison below runs the same weights down two float paths (packed vs latent, cached vs
full, padded vs unpadded, jit vs eager). Through a BitNet model such paths can differ by more
than float noise when an int8 activation sits on a rounding tie (conftest docstring), so each
property is checked sharply per layer or on the float-Llama twin of the tiny config, and end to
end on the BitNet fixture, whose logits were verified to stay ~1e-6 apart on these inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import forward
from bitnet_jax.model.cache import attention_mask, init_cache
from bitnet_jax.quant import is_packed
from bitnet_jax.model.layers import rope_frequencies
from bitnet_jax.model.transformer import apply, block, embed, unembed
from bitnet_jax.model.params import (BITLINEAR_PATHS, count_params, init_params, layer, pack_params,
                               param_shapes)
from bitnet_jax.model.policy import Policy, get_policy
from conftest import MODEL_TOL

B, T, S = 3, 7, 11

# One jitted entry point per call pattern, shared by every test, so each (config, shape) pair
# compiles once per session (XLA:CPU compiles dominate this file's run time).
jit_forward = jax.jit(forward, static_argnums=(2, 3))


@functools.partial(jax.jit, static_argnums=2)
def jit_logits(params, tokens, cfg, cache=None, pos=None, slot=None):
    """apply + unembed: (logits [B, T, V], new cache or None)."""
    h, cache = apply(params, tokens, cfg, cache=cache, pos=pos, slot=slot)
    return unembed(params, h, cfg), cache


jit_block = jax.jit(lambda *a: block(*a)[0], static_argnums=(5, 6))
def at(i):
    """Every row's next position is i: [B] int32 (a traced value, so calls share programs)."""
    return jnp.full((B,), i, jnp.int32)


def _tokens(vocab: int, seed: int = 7, shape=(B, T)) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _right_padded_forward(params, cfg, rows):
    """Logits of each row run alone from position 0, as a list of [n, V].

    Rows are placed at the start of one [B, T] batch; causality makes the filler after them
    irrelevant, so this reuses the [B, T] compilation instead of one per row length.
    """
    batch = np.full((B, T), 3, np.int32)
    for r, row in enumerate(rows):
        batch[r, :len(row)] = row
    logits = np.asarray(jit_forward(params, jnp.asarray(batch), cfg, None))
    return [logits[r, :len(row)] for r, row in enumerate(rows)]


@pytest.fixture(scope="module", params=["bitnet", "float"])
def variant(request, tiny_cfg, tiny_packed_params, tiny_float_cfg, tiny_float_params):
    """(cfg, params, tolerance): packed BitNet at MODEL_TOL, float Llama at 1e-5."""
    if request.param == "bitnet":
        return tiny_cfg, tiny_packed_params, MODEL_TOL
    return tiny_float_cfg, tiny_float_params, 1e-5


# ---- shapes and params ------------------------------------------------------------------------


def test_param_shapes_and_init_params(tiny_cfg):
    shapes = param_shapes(tiny_cfg)
    assert shapes["embed_tokens"] == (61, 32) and "lm_head" not in shapes  # tied
    attn, mlp = shapes["layers"]["self_attn"], shapes["layers"]["mlp"]
    assert (attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"]) == (
        (2, 32, 32), (2, 16, 32), (2, 16, 32), (2, 32, 32))
    assert (mlp["gate_proj"], mlp["up_proj"], mlp["down_proj"]) == (
        (2, 48, 32), (2, 48, 32), (2, 32, 48))
    assert (attn["attn_sub_norm"], mlp["ffn_sub_norm"]) == ((2, 32), (2, 48))
    # init_params follows param_shapes in the policy's parameter dtype (traced only: no compile).
    abstract = jax.eval_shape(lambda k: init_params(tiny_cfg, k, Policy("bfloat16")),
                              jax.random.key(0))
    got = jax.tree.map(lambda a: (a.shape, a.dtype), abstract)
    want = jax.tree.map(lambda s: (s, jnp.dtype(jnp.bfloat16)), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))
    assert got == want
    untied = param_shapes(tiny_cfg.replace(tie_word_embeddings=False))
    assert untied["lm_head"] == (61, 32)


def test_pack_params_layout(tiny_cfg, tiny_params, tiny_packed_params):
    for mod, name in BITLINEAR_PATHS:
        leaf = tiny_packed_params["layers"][mod][name]
        o, i = tiny_params["layers"][mod][name].shape[1:]
        assert is_packed(leaf)
        assert leaf["packed"].shape == (2, o // 4, i) and leaf["packed"].dtype == jnp.uint8
        assert leaf["scale"].shape == (2,) and leaf["scale"].dtype == jnp.float32
        for l in range(2):  # codes in {-1, 0, 1} (never code 3) and the layer's γ as scale
            codes = np.stack([(np.asarray(leaf["packed"][l]) >> (2 * k)) & 3 for k in range(4)])
            assert codes.max() <= 2
            gamma = np.abs(np.asarray(tiny_params["layers"][mod][name][l])).mean()
            assert float(leaf["scale"][l]) == pytest.approx(gamma, rel=1e-6)
    assert pack_params(tiny_packed_params, tiny_cfg)["layers"]["mlp"]["up_proj"] is (
        tiny_packed_params["layers"]["mlp"]["up_proj"])  # already packed leaves are kept
    assert count_params(tiny_packed_params) == count_params(tiny_params)
    assert layer(tiny_params, 1)["mlp"]["down_proj"].shape == (32, 48)


def test_forward_and_apply_shapes(tiny_cfg, tiny_packed_params):
    cfg, params = tiny_cfg, tiny_packed_params
    tokens = _tokens(cfg.vocab_size)
    logits = jit_forward(params, tokens, cfg, None)
    assert logits.shape == (B, T, 61) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    h, none = jax.eval_shape(lambda p, t: apply(p, t, cfg), params, tokens)
    assert h.shape == (B, T, 32) and h.dtype == jnp.float32 and none is None
    cache = init_cache(cfg, B, S)
    logits, new_cache = jit_logits(params, tokens[:, :4], cfg, cache, at(0))
    assert logits.shape == (B, 4, 61)
    assert jax.tree.map(jnp.shape, new_cache) == jax.tree.map(jnp.shape, cache)
    # Slots 0..3 now hold this call's keys and values; later slots are still empty.
    for kv in (np.asarray(new_cache["k"]), np.asarray(new_cache["v"])):
        # [L, B, K, S, H]
        assert not kv[:, :, :, 4:].any() and np.abs(kv[:, :, :, :4]).sum(axis=(2, 4)).all()


def test_unembed_picks_tied_embedding_or_lm_head(tiny_float_cfg, tiny_float_params, rng):
    h = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
    emb = np.asarray(tiny_float_params["embed_tokens"])
    tied = unembed(tiny_float_params, h, tiny_float_cfg)
    assert tied.shape == (2, 3, 61) and tied.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(tied), np.asarray(h) @ emb.T, rtol=1e-5, atol=1e-5)
    params = dict(tiny_float_params, lm_head=jnp.asarray(emb[::-1] * 2))
    untied = unembed(params, h, tiny_float_cfg.replace(tie_word_embeddings=False))
    np.testing.assert_allclose(np.asarray(untied), 2 * np.asarray(tied)[..., ::-1],
                               rtol=1e-5, atol=1e-5)


def test_unembed_int8_rows_matches_formula(tiny_params, tiny_cfg, rng):
    # Optional int8 row-scaled LM head {"q8", "scale"}: logits = (h_q · q8ᵀ)·step·scale.
    emb = np.asarray(tiny_params["embed_tokens"])
    scale = np.abs(emb).max(-1) / 127.0
    q8 = np.round(emb / scale[:, None]).astype(np.int8)
    params = dict(tiny_params, embed_tokens={"q8": jnp.asarray(q8), "scale": jnp.asarray(scale)})
    for m in (1, 5):  # M=1 takes the padded-row path
        h = rng.normal(size=(m, 32)).astype(np.float32)
        absmax = np.abs(h).max(-1, keepdims=True)
        h_q = np.round(h * (np.float32(127.0) / absmax)).astype(np.int64)
        want = (h_q @ q8.astype(np.int64).T) * (absmax / 127.0) * scale
        got = unembed(params, jnp.asarray(h), tiny_cfg)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ---- packed == latent -----------------------------------------------------------------------


def test_packed_equals_latent_per_layer(tiny_cfg, tiny_params, tiny_packed_params):
    # Identical input to each decoder layer, so identical int8 activations and ternary codes;
    # the only difference is int32 vs f32 accumulation: within 1e-6 of the output's scale.
    policy = get_policy(None)
    x = embed(tiny_params, _tokens(61), policy)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_frequencies(positions, tiny_cfg.head_dim, tiny_cfg.rope_theta)
    mask = attention_mask(jnp.zeros((B,), jnp.int32), T, T)
    for i in range(tiny_cfg.num_hidden_layers):
        y_latent = np.asarray(
            jit_block(layer(tiny_params, i), x, cos, sin, mask, tiny_cfg, policy))
        y_packed = np.asarray(
            jit_block(layer(tiny_packed_params, i), x, cos, sin, mask, tiny_cfg, policy))
        assert np.abs(y_packed - y_latent).max() <= 1e-6 * np.abs(y_latent).max(), f"layer {i}"
        x = jnp.asarray(y_latent)


def test_packed_equals_latent_end_to_end(tiny_cfg, tiny_params, tiny_packed_params):
    # Argmax must agree everywhere. Tolerance: one int8 flip moves a BitLinear output by
    # step·γ ≈ max|x|/127·γ, i.e. ~1e-2 on O(1) logits; these inputs have no flip (measured
    # ~1.4e-6), so MODEL_TOL holds and a real layout bug (O(1) changes) cannot hide below it.
    tokens = _tokens(61)
    latent = np.asarray(jit_forward(tiny_params, tokens, tiny_cfg, None))
    packed = np.asarray(jit_forward(tiny_packed_params, tokens, tiny_cfg, None))
    np.testing.assert_array_equal(packed.argmax(-1), latent.argmax(-1))
    np.testing.assert_allclose(packed, latent, rtol=0, atol=MODEL_TOL)


# ---- jit, cache, padding --------------------------------------------------------------------


def test_jit_equals_eager(tiny_cfg, tiny_packed_params):
    tokens = _tokens(61, seed=3, shape=(2, 5))
    jitted = np.asarray(jit_forward(tiny_packed_params, tokens, tiny_cfg, None))
    with jax.disable_jit():
        eager = np.asarray(forward(tiny_packed_params, tokens, tiny_cfg))
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=MODEL_TOL)


def test_decode_matches_full_forward(variant):
    # Prefill 4 tokens into an S=11 cache, then 3 single-token steps: every position's logits
    # equal one full forward (flax test_forward_equivalence).
    cfg, params, tol = variant
    tokens = _tokens(cfg.vocab_size)
    full = np.asarray(jit_forward(params, tokens, cfg, None))
    cache = init_cache(cfg, B, S)
    logits, cache = jit_logits(params, tokens[:, :4], cfg, cache, at(0))
    outs = [logits]
    for i in range(4, T):
        logits, cache = jit_logits(params, tokens[:, i:i + 1], cfg, cache, at(i))
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=0, atol=tol)


def test_chunked_prefill_matches_full_forward(tiny_cfg, tiny_packed_params):
    # Two multi-token writes, the second at a non-zero cursor (chunked prompt processing).
    cfg, params = tiny_cfg, tiny_packed_params
    tokens = _tokens(cfg.vocab_size, seed=11)
    full = np.asarray(jit_forward(params, tokens, cfg, None))
    cache = init_cache(cfg, B, S)
    first, cache = jit_logits(params, tokens[:, :4], cfg, cache, at(0))
    second, cache = jit_logits(params, tokens[:, 4:], cfg, cache, at(4))
    got = np.concatenate([first, second], axis=1)
    np.testing.assert_allclose(got, full, rtol=0, atol=MODEL_TOL)


def test_right_padding_is_invisible_to_real_tokens(variant):
    # Rows of length 7, 4 and 1 in one [B, T] call, right-padded with junk ids: causality keeps
    # the junk out of reach of the real positions, which match each row run alone.
    cfg, params, tol = variant
    lengths = [7, 4, 1]
    rows = [np.asarray(_tokens(cfg.vocab_size, seed=20 + r, shape=(1, n)))[0]
            for r, n in enumerate(lengths)]
    real = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    outs = []
    for junk in (5, 9):
        batch = np.full((B, T), junk, np.int32)
        for r, row in enumerate(rows):
            batch[r, :len(row)] = row
        outs.append(np.asarray(jit_logits(params, jnp.asarray(batch), cfg)[0]))
    assert np.isfinite(outs[0]).all()
    np.testing.assert_array_equal(outs[0][real], outs[1][real])
    for r, alone in enumerate(_right_padded_forward(params, cfg, rows)):
        np.testing.assert_allclose(outs[0][r, :lengths[r]], alone, rtol=0, atol=tol,
                                   err_msg=f"row {r}")


def test_slots_at_their_own_positions_match_unpadded(variant):
    # The serving engine's pattern: prompts of 4, 2 and 3 ids prefilled one at a time into
    # their own cache rows (a one-row call with a traced slot), then 3 decode steps of all rows
    # at their own positions: each row's logits equal its own unpadded forward.
    cfg, params, tol = variant
    lengths, steps = [4, 2, 3], 3
    rows = [np.asarray(_tokens(cfg.vocab_size, seed=40 + r, shape=(1, n + steps)))[0]
            for r, n in enumerate(lengths)]
    cache = init_cache(cfg, B, S)
    got = [[] for _ in range(B)]
    for r in (1, 2, 0):
        chunk = np.zeros((1, 4), np.int32)
        chunk[0, :lengths[r]] = rows[r][:lengths[r]]
        logits, cache = jit_logits(params, jnp.asarray(chunk), cfg, cache,
                                   jnp.zeros((1,), jnp.int32), jnp.int32(r))
        got[r].append(logits[0, lengths[r] - 1])
    for s in range(steps):
        new = jnp.asarray([[rows[r][lengths[r] + s]] for r in range(B)], jnp.int32)
        pos = jnp.asarray([n + s for n in lengths], jnp.int32)
        logits, cache = jit_logits(params, new, cfg, cache, pos)
        for r in range(B):
            got[r].append(logits[r, 0])
    for r, alone in enumerate(_right_padded_forward(params, cfg, rows)):
        np.testing.assert_allclose(np.stack(got[r]), alone[lengths[r] - 1:], rtol=0, atol=tol,
                                   err_msg=f"row {r}")


def test_bf16_policy_runs_and_returns_f32_logits(tiny_cfg, tiny_packed_params):
    policy = get_policy("gpu")  # bf16 activations and cache, f32 logits
    tokens = _tokens(61)
    logits = jit_forward(tiny_packed_params, tokens, tiny_cfg, policy)
    ref = np.asarray(jit_forward(tiny_packed_params, tokens, tiny_cfg, None))
    assert logits.dtype == jnp.float32
    # bf16 keeps ~3 significant digits: close in value, mostly the same argmax.
    assert np.abs(np.asarray(logits) - ref).max() < 0.25 * np.abs(ref).max()
    assert (np.asarray(logits).argmax(-1) == ref.argmax(-1)).mean() >= 0.8


# ---- CPU kernels == the XLA path ------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(2, 3))
def jit_logits_policy(params, tokens, cfg, policy, cache=None, pos=None):
    h, cache = apply(params, tokens, cfg, policy, cache=cache, pos=pos)
    return unembed(params, h, cfg, policy), cache


def test_cpu_kernels_give_the_xla_logits(tiny_cfg, tiny_packed_params, tiny_float_cfg,
                                         tiny_float_params, monkeypatch):
    # kernel="ffi" runs the packed ternary kernel on the stacked weights (in one call with the
    # layer's RMSNorms, residual adds and activation: kernels/cpu/fused.py), the int8 head kernel
    # and the cached-attention kernel; kernel="xla" runs none of them. The integer kernels are
    # exact and the fused call's float work rounds within a few ulp of XLA's, so with the
    # attention kernel off the logits agree to ~1e-6 (2e-6 here), KV cache and rows at different
    # positions included; an int8 activation tipped over a rounding step would move a logit by
    # ~1e-2 (conftest), a wrong norm or product O(1). The attention kernel sums in another order
    # than XLA (a few 1e-7, test_attention.py); through the BitNet model that noise flips any
    # int8 activation within ~1e-5 of a rounding tie, and inputs of this size always hold some
    # (the closest over seeds 0-7: 5e-6 to 5e-5 of a step). So the attention kernel is checked
    # end to end on the float twin, which has no int8 step.
    from bitnet_jax.kernels.cpu import ffi as cpu_ffi
    from bitnet_jax.model.params import quantize_lm_head

    if jax.default_backend() != "cpu" or not cpu_ffi.available():
        pytest.skip(f"CPU FFI extension not available: {cpu_ffi.unavailable_reason()}")
    ffi, xla = Policy(kernel="ffi"), Policy(kernel="xla")
    tokens = _tokens(tiny_cfg.vocab_size, seed=5)
    offsets = jnp.asarray([0, 2, 1], jnp.int32)  # each row at its own position

    def cached(run, params, cfg, policy):
        cache = init_cache(cfg, B, S)
        logits, cache = run(params, tokens[:, :4], cfg, policy, cache, offsets)
        steps = [logits[:, -1]]
        for i in range(4, T):
            logits, cache = run(params, tokens[:, i:i + 1], cfg, policy, cache, offsets + i)
            steps.append(logits[:, -1])
        return np.stack(steps, axis=1)

    # A jit (and function object) of its own: traces made with the attention kernel switched off
    # stay out of jit_logits_policy's caches.
    no_attention_kernel = jax.jit(lambda *a: jit_logits_policy.__wrapped__(*a),
                                  static_argnums=(2, 3))
    for params in (tiny_packed_params, quantize_lm_head(tiny_packed_params, tiny_cfg)):
        np.testing.assert_allclose(
            np.asarray(jit_logits_policy(params, tokens, tiny_cfg, ffi)[0]),
            np.asarray(jit_logits_policy(params, tokens, tiny_cfg, xla)[0]), rtol=0, atol=2e-5)
        with monkeypatch.context() as m:
            m.setattr(cpu_ffi, "attention_usable", lambda q, cache_k: False)
            np.testing.assert_allclose(cached(no_attention_kernel, params, tiny_cfg, ffi),
                                       cached(no_attention_kernel, params, tiny_cfg, xla),
                                       rtol=0, atol=2e-5)
    got = cached(jit_logits_policy, tiny_float_params, tiny_float_cfg, ffi)
    want = cached(jit_logits_policy, tiny_float_params, tiny_float_cfg, xla)
    np.testing.assert_allclose(got, want, rtol=0, atol=MODEL_TOL)  # 8e-6 here; a bug: O(1)


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16", "int8"])
def test_16bit_kv_cache_stays_close_to_float32(tiny_cfg, tiny_packed_params, cache_dtype):
    # Policy.kv_cache_dtype: the cache rounds keys/values to 16 bits (or to int8 codes of each
    # row's absmax). Most logits move by that rounding only; where it tips an int8 activation
    # over a rounding step (conftest) a logit moves by a few 1e-2 of the logit scale. A cache
    # read wrongly (an int8 row's scale ignored) would move everything O(1).
    cfg, params = tiny_cfg, tiny_packed_params
    tokens = _tokens(cfg.vocab_size, seed=9)
    outs = {}
    for dtype in ("float32", cache_dtype):
        cache = init_cache(cfg, B, S, dtype)
        logits, cache = jit_logits(params, tokens[:, :4], cfg, cache, at(0))
        steps = [logits]
        for i in range(4, T):
            logits, cache = jit_logits(params, tokens[:, i:i + 1], cfg, cache, at(i))
            steps.append(logits)
        assert cache["k"].dtype == jnp.dtype(dtype)
        outs[dtype] = np.concatenate(steps, axis=1)
    ref, got = outs["float32"], outs[cache_dtype]
    scale = np.abs(ref).max()
    err = np.abs(got - ref)
    # median / scale here: float16 9e-5, bfloat16 2.3e-3, int8 3.1e-3 (H = 8: a coarse absmax)
    assert np.median(err) <= (5e-4 if cache_dtype == "float16" else 6e-3) * scale
    assert err.max() <= 0.05 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
