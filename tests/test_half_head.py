"""A packed model keeps a 16-bit embedding / LM head table as the file stores it (params.table_dtype)
and widens it exactly where read: the same logits and tokens as the float32 table, in half the
memory; the CPU head kernel for such a table (kernels/cpu/half_head_cpu.h) against XLA's dot."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bitnet_jax as bj
from bitnet_jax.model.transformer import apply, unembed
from bitnet_jax.runtime import memory
from bitnet_jax.runtime.placement import place_params
from conftest import kernel_path, kernel_paths

DEFAULT = Path(bj.__file__).parent / "data" / "default.gguf"  # F16 token_embd, tied


def _ffi():
    from bitnet_jax.kernels.cpu import half_head
    from bitnet_jax.kernels.cpu.library import available, unavailable_reason

    if jax.default_backend() != "cpu" or not available():
        pytest.skip(f"CPU FFI extension not available: {unavailable_reason()}")
    return half_head


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("m,d,v", [(1, 37, 5), (2, 8, 3), (3, 64, 9), (4, 256, 1001),
                                   (5, 17, 7), (6, 40, 11), (9, 96, 33), (11, 24, 6),
                                   (32, 72, 130), (0, 8, 4)])
def test_half_head_kernel_matches_xla_dot_of_the_widened_table(dtype, m, d, v):
    # Odd D (the columns past the last 8), odd V (row blocks of 4 / 2 and single rows), 1-6
    # tokens per block and their remainders, on every kernel path: float32 sums of the same
    # exact products, so within float32 rounding of sum |x||w|.
    half_head = _ffi()
    rng = np.random.default_rng(m * 1000 + d + v)
    x = jnp.asarray(rng.standard_normal((m, d)) * rng.uniform(0.1, 10, (m, 1)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((v, d)), jnp.float32).astype(dtype)
    wf = np.asarray(w.astype(jnp.float32))
    want = np.asarray(x) @ wf.T.astype(np.float64)
    bound = 1e-6 * (np.abs(np.asarray(x)) @ np.abs(wf).T) * max(1, np.sqrt(d))
    for isa in kernel_paths():
        with kernel_path(isa):
            got = np.asarray(jax.jit(half_head.half_linear_ffi)(x, w))
        assert got.shape == (m, v) and got.dtype == np.float32, isa
        assert np.all(np.abs(got - want) <= bound + 1e-30), isa


def test_half_head_kernel_keeps_nan_and_refuses_other_tables():
    half_head = _ffi()
    x = jnp.ones((2, 16), jnp.float32).at[1, 3].set(jnp.nan)
    w = jnp.ones((5, 16), jnp.float16)
    got = np.asarray(half_head.half_linear_ffi(x, w))
    assert np.all(got[0] == 16) and np.all(np.isnan(got[1]))
    with pytest.raises(half_head.KernelError, match="float16 / bfloat16 w"):
        half_head.half_linear_ffi(x, w.astype(jnp.float32))


def test_gguf_float16_table_stays_16_bit_for_inference_only():
    m = bj.load_model(DEFAULT)
    assert m.params["embed_tokens"].dtype == jnp.float16
    assert bj.load_model(DEFAULT, packed=False).params["embed_tokens"].dtype == jnp.float32
    assert bj.load_model(DEFAULT, policy="gpu").params["embed_tokens"].dtype == jnp.bfloat16
    int8 = bj.load_model(DEFAULT, policy=bj.Policy(lm_head="int8")).params["embed_tokens"]
    assert int8["q8"].dtype == jnp.int8
    # Placed for the float32 policy it stays 16-bit, and the memory estimate says so.
    cpu = bj.get_policy("cpu")
    placed = place_params(m, jax.devices("cpu")[0], cpu)
    assert placed["embed_tokens"].dtype == jnp.float16
    assert memory.placed_bytes(m.params, cpu) == memory.tree_bytes(placed)


def test_hf_bfloat16_table_stays_16_bit(tmp_path):
    from bitnet_jax.formats.hf import save_hf

    m = bj.load_model(DEFAULT)
    params = dict(m.params, embed_tokens=m.params["embed_tokens"].astype(jnp.bfloat16))
    save_hf(tmp_path / "hf", m.config, params)
    got = bj.load_model(tmp_path / "hf", tokenizer=False).params["embed_tokens"]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(params["embed_tokens"], np.float32))


def test_16_bit_table_gives_the_float32_tables_logits_and_tokens():
    # The same model with its table widened to float32 at load (the previous behaviour): the
    # logits of a prompt (XLA's dot against the kernel at the last token) agree to float32
    # rounding, and greedy generation gives the same tokens.
    m = bj.load_model(DEFAULT)
    wide = dataclasses.replace(m, params=dict(
        m.params, embed_tokens=m.params["embed_tokens"].astype(jnp.float32)))
    cfg = m.config
    tokens = jnp.asarray([[1, 403, 2058, 384, 960, 325, 368]], jnp.int32)
    h, _ = apply(m.params, tokens, cfg, "cpu")
    for last in (h[:, -1], h[0]):  # one token (the kernel), seven
        got = np.asarray(jax.jit(lambda p, x: unembed(p, x, cfg, "cpu"))(m.params, last))
        want = np.asarray(jax.jit(lambda p, x: unembed(p, x, cfg, "cpu"))(wide.params, last))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # The train policy (float32 params, bfloat16 compute) keeps the head in float32 too.
    train = jax.jit(lambda p, x: unembed(p, x, cfg, "train"))
    np.testing.assert_allclose(np.asarray(train(m.params, h[0])),
                               np.asarray(train(wide.params, h[0])), rtol=1e-5, atol=1e-4)
    for prompt in ("Once upon a time", "Lily wanted to"):
        a = bj.generate(m, prompt, max_new_tokens=24)[0]
        b = bj.generate(wide, prompt, max_new_tokens=24)[0]
        assert a.token_ids == b.token_ids and len(a.token_ids) == 24
