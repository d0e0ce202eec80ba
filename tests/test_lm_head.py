"""The int8 per-row LM head (Policy.lm_head="int8"): made the same way by every path, close to float."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax as bj
from bitnet_jax.formats.hf import save_hf
from bitnet_jax.model.params import quantize_lm_head
from bitnet_jax.quant import row_int8_np
from conftest import kernel_path, kernel_paths

# Hidden size 256 (multiple of 256, so TQ2_0 rows fit), tied embeddings, relu² and sub-norms.
CFG = bj.ModelConfig(vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     hidden_act="relu2", tie_word_embeddings=True, architecture="BitNetForCausalLM",
                     use_sub_norms=True, model_type="bitnet", linear_class="autobitlinear")


@pytest.fixture(scope="module")
def packed():
    params = bj.init_params(CFG, jax.random.PRNGKey(3), std=0.02)
    return bj.pack_params(params, CFG)


def test_numpy_and_jax_row_int8_are_identical():
    w = np.random.default_rng(0).normal(size=(300, 257)).astype(np.float32)
    q, s = row_int8_np(w)
    ref = quantize_lm_head({"embed_tokens": jnp.asarray(w)}, CFG)["embed_tokens"]
    np.testing.assert_array_equal(q, np.asarray(ref["q8"]))
    np.testing.assert_array_equal(s, np.asarray(ref["scale"]))
    # Round trip error is at most half a step per weight.
    assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] * 0.5 + 1e-7)


@pytest.mark.parametrize("fmt", ["hf", "tq2_0", "i2_s"])
def test_loaders_make_the_same_int8_head(packed, tmp_path, fmt):
    hf = tmp_path / "hf"
    save_hf(hf, CFG, packed)
    path = hf
    if fmt != "hf":
        from bitnet_jax.formats.gguf.write import write_model_gguf

        path = tmp_path / f"m-{fmt}.gguf"
        write_model_gguf(bj.load_model(hf), path, qtype=fmt)
    floats = bj.load_model(path)
    int8 = bj.load_model(path, policy=bj.Policy(lm_head="int8"))
    ref = quantize_lm_head(floats.params, CFG)["embed_tokens"]
    np.testing.assert_array_equal(np.asarray(int8.params["embed_tokens"]["q8"]), np.asarray(ref["q8"]))
    np.testing.assert_array_equal(np.asarray(int8.params["embed_tokens"]["scale"]),
                                  np.asarray(ref["scale"]))


def _cos(a, b):
    return float(jnp.min(jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) *
                                                jnp.linalg.norm(b, axis=-1))))


def test_int8_head_logits_close_to_float(packed):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 11), 0, CFG.vocab_size)
    quant = quantize_lm_head(packed, CFG)
    # The head alone, on the same hidden states: half an int8 step per weight and activation.
    h, _ = bj.apply(packed, tokens, CFG)
    assert _cos(bj.unembed(packed, h, CFG), bj.unembed(quant, h, CFG)) > 0.9999
    # End to end (the tied embedding is int8 too, so every layer sees slightly different input).
    a, b = bj.forward(packed, tokens, CFG), bj.forward(quant, tokens, CFG)
    assert _cos(a, b) > 0.999
    assert float(jnp.mean(a.argmax(-1) == b.argmax(-1))) >= 0.9


def test_untied_int8_head_keeps_float_embedding():
    cfg = CFG.replace(tie_word_embeddings=False)
    params = bj.init_params(cfg, jax.random.PRNGKey(0))
    q = quantize_lm_head(params, cfg)
    assert isinstance(q["lm_head"], dict) and not isinstance(q["embed_tokens"], dict)
    tokens = jnp.array([[1, 2, 3]])
    np.testing.assert_allclose(bj.forward(q, tokens, cfg), bj.forward(params, tokens, cfg),
                               atol=0.05 * float(jnp.abs(bj.forward(params, tokens, cfg)).max()))


@pytest.mark.parametrize("m,i,v", [(1, 1536, 32000), (8, 1536, 32002), (3, 100, 61),
                                   (13, 64, 37)])
def test_int8_head_in_one_cpu_call_gives_unembed_logits(xla_optimized, m, i, v):
    # The CPU kernel's int8 head from float activations (quantisation, the int8 product and
    # acc * step * scale in one call, ffi_int8.h) against the XLA ops transformer.unembed runs
    # otherwise, on the GEMV (M = 1), the 8-token blocks and their remainders, on every path.
    # Both round the same products in the same order: the same floats (to 1 ulp, should XLA
    # ever reorder its two products).
    from bitnet_jax.kernels.cpu import ffi as cpu_ffi
    from bitnet_jax.quant import quantize_activations

    if jax.default_backend() != "cpu" or not cpu_ffi.available():
        pytest.skip(f"CPU FFI extension not available: {cpu_ffi.unavailable_reason()}")
    rng = np.random.default_rng(m + i + v)
    x = jnp.asarray(rng.standard_normal((m, i)) * rng.uniform(0.1, 20, (m, 1)), jnp.float32)
    w = jnp.asarray(rng.integers(-127, 128, (v, i)), jnp.int8)
    scale = jnp.asarray(rng.uniform(1e-3, 2e-2, v), jnp.float32)

    def composed(x, w, scale):
        x_q, step = quantize_activations(x)
        return cpu_ffi.int8_matmul_xla(x_q, w).astype(jnp.float32) * step * scale[None, :]

    want = np.asarray(jax.jit(composed)(x, w, scale))
    for isa in kernel_paths(all_paths=False):
        with kernel_path(isa):
            got = np.asarray(jax.jit(cpu_ffi.int8_linear_ffi)(x, w, scale))
            assert got.shape == (m, v) and got.dtype == np.float32
            np.testing.assert_array_max_ulp(got, want, maxulp=1)
    with pytest.raises(cpu_ffi.KernelError, match=r"x \[M, I\], w \[V, I\] and scale \[V\]"):
        cpu_ffi.int8_linear_ffi(x, w, scale[:-1])
