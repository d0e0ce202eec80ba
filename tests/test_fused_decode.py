"""The fused GPU decode kernels (kernels/gpu/fused.py, decode_attention.py) and model/fused.py
against the composed path they replace: in Pallas interpret mode on a CPU, compiled on a GPU
(benchmarks/gpu_check.sh runs this file there).

A user relies on kernel="auto" on a GPU giving the same tokens as the XLA path: every fused
piece is compared here with the XLA composition of model/bitlinear.py, model/cache.py and
model/attention.py (float32: to float rounding; bfloat16: bit for bit for the BitLinears), and a
whole decode step of the model with the fused layers against kernel="xla". Compiling them for
an H100 is tests/test_gpu_aot.py's job.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.errors import ConfigError
from bitnet_jax.kernels.gpu.decode_attention import decode_attention
from bitnet_jax.kernels.gpu.fused import fused_bitlinear
from bitnet_jax.kernels.gpu.platform import on_gpu
from bitnet_jax.kernels.xla import ternary_matmul_xla
from bitnet_jax.model import cache as kv_cache
from bitnet_jax.model import fused, transformer
from bitnet_jax.model.attention import attend
from bitnet_jax.model.layers import activation, apply_rope, rms_norm, rope_frequencies
from bitnet_jax.model.params import init_params, pack_params
from bitnet_jax.model.policy import get_policy
from bitnet_jax.quant import quantize_activations

L, I = 3, 96


def _packed(rng, r: int) -> jax.Array:
    """Random stacked [L, r, I] codes 0..2 (quant.py layout)."""
    c = rng.integers(0, 3, (L, r, I, 4)).astype(np.uint8)
    return jnp.asarray(c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6)


def _composed(x, ws, scales, layer, norm, residual=None, act=None):
    """model/bitlinear.py's XLA composition of what fused_bitlinear does in one call."""
    y = rms_norm(x, norm[layer], 1e-5) if norm is not None else x
    x_q, step = quantize_activations(y)
    outs = [(ternary_matmul_xla(x_q, w[layer]).astype(jnp.float32) * (step * s[layer]))
            .astype(x.dtype) for w, s in zip(ws, scales)]
    if act is not None:
        return (act(outs[0].astype(jnp.float32)) * outs[1].astype(jnp.float32)).astype(x.dtype)
    out = jnp.concatenate(outs, axis=-1)
    return out if residual is None else residual + out


def _relu2(v):
    return activation("relu2", v)


def _silu(v):
    return activation("silu", v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("case", ["qkv", "no_norm_residual", "relu2", "silu"])
def test_fused_bitlinear_matches_the_composition(dtype, m, case):
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.normal(size=(m, I)) * 3, dtype)
    gain = jnp.asarray(rng.normal(size=(L, I)), dtype)
    layer = 1
    if case == "qkv":
        ws, kw = [_packed(rng, 32), _packed(rng, 16), _packed(rng, 16)], {"norm": gain}
    elif case == "no_norm_residual":
        ws = [_packed(rng, 16)]
        kw = {"norm": None, "residual": jnp.asarray(rng.normal(size=(m, 64)), dtype)}
    else:
        ws, kw = [_packed(rng, 32), _packed(rng, 32)], {
            "norm": gain, "act": _relu2 if case == "relu2" else _silu}
    scales = [jnp.asarray(rng.uniform(0.5, 2.0, (L,)), jnp.float32) for _ in ws]
    got = fused_bitlinear(x, ws, scales, layer, eps=1e-5, **kw)
    want = _composed(x, ws, scales, layer, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.bfloat16 and not on_gpu():  # same roundings in the same order
        np.testing.assert_array_equal(got, want)
    else:  # sums in another order (GPU: its rsqrt too): a rare quantisation tie may flip
        rtol = 1e-4 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_fused_bitlinear_rejects_shapes_it_cannot_take():
    rng = np.random.default_rng(0)
    x = jnp.ones((2, I), jnp.float32)
    s = [jnp.ones((L,), jnp.float32)]
    with pytest.raises(ConfigError, match="M <= 16"):
        fused_bitlinear(jnp.ones((17, I)), [_packed(rng, 16)], s, 0)
    with pytest.raises(ConfigError, match="R % 16"):
        fused_bitlinear(x, [_packed(rng, 8)], s, 0)
    with pytest.raises(ConfigError, match="gate and up"):
        fused_bitlinear(x, [_packed(rng, 16)], s, 0, act=_relu2)
    with pytest.raises(ConfigError, match="residual"):
        fused_bitlinear(x, [_packed(rng, 16)], s, 0, residual=jnp.ones((2, 8)))


@pytest.mark.parametrize("dtype,kv_dtype,tol", [
    (jnp.float32, jnp.float32, 1e-5), (jnp.bfloat16, jnp.bfloat16, 2e-2),
    (jnp.bfloat16, jnp.float16, 2e-2)])
@pytest.mark.parametrize("hd", [32, 24, 8])  # halves of 16 (no padding), 12 and 4 (padded)
def test_decode_attention_matches_write_then_attend(dtype, kv_dtype, tol, hd):
    rng = np.random.default_rng(1)
    nl, rows, k, s, h, n = 2, 3, 2, 64, hd, 4
    ck = jnp.asarray(rng.normal(size=(nl, rows, k, s, h)), kv_dtype)
    cv = jnp.asarray(rng.normal(size=(nl, rows, k, s, h)), kv_dtype)
    pos = jnp.asarray([0, 37], jnp.int32)  # two rows of three slots, far apart
    b, layer = 2, 1
    qkv = jnp.asarray(rng.normal(size=(b, (n + 2 * k) * h)), dtype)
    cos, sin = rope_frequencies(pos[:, None], h, 10000.0)
    out, new_k, new_v = decode_attention(qkv, cos[:, 0], sin[:, 0], ck, cv, layer, pos,
                                         heads=n)
    q = apply_rope(qkv[:, :n * h].reshape(b, 1, n, h), cos, sin)
    keys = apply_rope(qkv[:, n * h:(n + k) * h].reshape(b, 1, k, h), cos, sin)
    values = qkv[:, (n + k) * h:].reshape(b, 1, k, h)
    cache = kv_cache.write({"k": ck, "v": cv}, keys.transpose(0, 2, 1, 3),
                           values.transpose(0, 2, 1, 3), layer, pos)
    view_k, view_v = kv_cache.layer_view(cache, layer, b)

    class Cfg:
        num_key_value_heads, num_groups = k, n // k

    class Pol:
        compute = dtype

    want = attend(q, view_k.astype(dtype), view_v.astype(dtype),
                  kv_cache.attention_mask(pos, 1, s), Cfg, Pol).reshape(b, n * h)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
    for got, ref in ((new_k, cache["k"]), (new_v, cache["v"])):  # the same cache, row 2 untouched
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                                   rtol=1e-6, atol=1e-6)


def _wide_cfg(tiny_cfg):
    """tiny with head_dim 32 (the fused attention needs H/2 >= 16) and R % 16 == 0."""
    return tiny_cfg.replace(hidden_size=128, intermediate_size=192, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32)


@pytest.mark.parametrize("compute,tol", [("float32", 1e-4), ("bfloat16", 0.25)])
def test_decode_step_with_fused_layers_matches_xla(tiny_cfg, compute, tol):
    cfg = _wide_cfg(tiny_cfg)
    params = pack_params(init_params(cfg, jax.random.PRNGKey(0)), cfg)
    tokens = jnp.asarray([[5, 7, 9, 11, 13], [3, 4, 5, 6, 7]], jnp.int32)
    logits, caches = {}, {}
    for kernel in ("xla", "pallas"):  # "pallas" on a CPU: interpret mode
        policy = get_policy("cpu").replace(kernel=kernel, compute_dtype=compute,
                                           param_dtype=compute)
        cache = kv_cache.init_cache(cfg, 3, 48, policy.kv_cache)
        _, cache = transformer.apply(params, tokens[:, :4], cfg, policy, cache=cache,
                                     pos=jnp.zeros((2,), jnp.int32))
        x = transformer.embed(params, tokens[:, 4:], policy)
        assert fused.usable(params["layers"], x, cache, cfg, policy, None) == (kernel == "pallas")
        with jax.default_matmul_precision("highest"):  # no TF32 on a GPU
            h, cache = jax.jit(lambda p, t, c: transformer.apply(
                p, t, cfg, policy, cache=c, pos=jnp.full((2,), 4, jnp.int32)))(
                    params, tokens[:, 4:], cache)
            logits[kernel] = np.asarray(transformer.unembed(params, h, cfg, policy), np.float32)
        caches[kernel] = np.asarray(cache["k"], np.float32)
    scale = np.abs(logits["xla"]).max()
    np.testing.assert_allclose(logits["pallas"], logits["xla"], atol=tol * scale, rtol=0)
    np.testing.assert_allclose(caches["pallas"], caches["xla"], atol=tol * 4, rtol=0)


def test_fused_layers_only_for_decode_steps(tiny_cfg):
    cfg = _wide_cfg(tiny_cfg)
    params = pack_params(init_params(cfg, jax.random.PRNGKey(0)), cfg)
    policy = get_policy("cpu").replace(kernel="pallas")
    cache = kv_cache.init_cache(cfg, 2, 32, policy.kv_cache)
    one = jnp.zeros((2, 1, cfg.hidden_size), policy.compute)
    layers = params["layers"]
    assert fused.usable(layers, one, cache, cfg, policy, None)
    assert not fused.usable(layers, one, None, cfg, policy, None)  # no cache: forward
    assert not fused.usable(layers, jnp.zeros((2, 4, cfg.hidden_size)), cache, cfg, policy, None)
    assert not fused.usable(layers, one[:1], cache, cfg, policy, jnp.int32(1))  # prefill slot
    assert not fused.usable(layers, one, cache, cfg, policy.replace(kernel="xla"), None)
    tiny = pack_params(init_params(tiny_cfg, jax.random.PRNGKey(0)), tiny_cfg)
    assert not fused.usable(tiny["layers"], one[..., :tiny_cfg.hidden_size],  # H = 8: composed
                            kv_cache.init_cache(tiny_cfg, 2, 32), tiny_cfg, policy, None)
