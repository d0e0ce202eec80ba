"""Parity of the Pallas GPU kernels with their references: the ternary matmul
(bitnet_jax/kernels/gpu/pallas.py, bit for bit against the XLA path) and cached attention
(kernels/gpu/attention.py, against a float64 numpy reference); the kernel="auto" fallback.

On CPU every call runs in Pallas interpret mode (slow, hence the small shapes); on a GPU the
same tests run the compiled Triton kernels, because `interpret=None` resolves by the target.
tests/test_gpu_aot.py compiles every configuration for an H100 without a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from bitnet_jax import kernels
from bitnet_jax.model.bitlinear import bitlinear
from bitnet_jax.quant import pack_ternary, pack_weights
from bitnet_jax.errors import ConfigError, DeviceError
from bitnet_jax.kernels.gpu import pallas as pallas_gpu
from bitnet_jax.kernels.gpu.pallas import BlockConfig, ternary_matmul_pallas
from bitnet_jax.kernels.xla import ternary_matmul_xla
from bitnet_jax.model.policy import Policy

ON_GPU = jax.default_backend() in ("gpu", "cuda", "rocm")


def _random_inputs(seed: int, m: int, i: int, o: int):
    """Random int8 activations [M, I] and random packed bytes [O/4, I] (code 3 included)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(-128, 128, size=(m, i)), dtype=jnp.int8)
    packed = jnp.asarray(rng.integers(0, 256, size=(o // 4, i)), dtype=jnp.uint8)
    return x, packed


def _assert_same(x, packed, **kwargs):
    got = ternary_matmul_pallas(x, packed, **kwargs)
    want = ternary_matmul_xla(x, packed)
    assert got.dtype == jnp.int32
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# M covers both variants (gemv ≤ 64 < gemm); I and O are block multiples and odd sizes.
@pytest.mark.parametrize(
    "m,i,o",
    [
        (1, 32, 4),
        (1, 256, 260),
        (3, 100, 48),
        (3, 256, 4),
        (8, 32, 260),
        (8, 100, 48),
        (64, 256, 48),
        (64, 100, 260),
        (130, 32, 48),
        (130, 256, 4),
    ],
)
def test_pallas_matches_xla(m, i, o):
    x, packed = _random_inputs(m * 1000 + i + o, m, i, o)
    _assert_same(x, packed)


@pytest.mark.parametrize("x_value", [-128, 127])
@pytest.mark.parametrize("t_value", [-1, 1])
def test_pallas_extreme_values(x_value, t_value):
    m, i, o = 8, 256, 48
    x = jnp.full((m, i), x_value, jnp.int8)
    packed = pack_ternary(jnp.full((o, i), t_value, jnp.int8))
    got = ternary_matmul_pallas(x, packed)
    np.testing.assert_array_equal(np.asarray(got), np.full((m, o), x_value * t_value * i))
    _assert_same(x, packed)


def test_pallas_code3_bytes_count_as_zero():
    m, i, o = 3, 100, 48
    x = jnp.full((m, i), -128, jnp.int8)
    all3 = jnp.full((o // 4, i), 0xFF, jnp.uint8)  # every plane holds code 3
    np.testing.assert_array_equal(np.asarray(ternary_matmul_pallas(x, all3)), 0)
    # 0b11_10_01_00: planes 0..3 hold codes 0, 1, 2, 3 -> t = -1, 0, +1, 0.
    mixed = jnp.full((o // 4, i), 0b11100100, jnp.uint8)
    got = np.asarray(ternary_matmul_pallas(x, mixed)).reshape(m, 4, o // 4)
    np.testing.assert_array_equal(got[:, 0], 128 * i)
    np.testing.assert_array_equal(got[:, 1], 0)
    np.testing.assert_array_equal(got[:, 2], -128 * i)
    np.testing.assert_array_equal(got[:, 3], 0)
    _assert_same(x, mixed)


@pytest.mark.parametrize("variant", ["gemv", "gemm"])
@pytest.mark.parametrize("m", [3, 70])
def test_pallas_both_variants(variant, m):
    x, packed = _random_inputs(7 + m, m, 100, 48)
    _assert_same(x, packed, variant=variant)


def test_pallas_variant_selection():
    assert pallas_gpu.select_variant(1) == "gemv"
    assert pallas_gpu.select_variant(64) == "gemv"
    assert pallas_gpu.select_variant(65) == "gemm"
    gemv = pallas_gpu.default_config(1, 640, 2560)
    gemm = pallas_gpu.default_config(512, 640, 2560)
    assert gemv.splits > 1 and gemm.splits == 1
    # 2B4T shapes: the blocks divide the real weight dims, so the weight is never padded.
    for r, i in [(640, 2560), (160, 2560), (1728, 2560), (640, 6912)]:
        for m in (1, 8, 64, 512):
            cfg = pallas_gpu.default_config(m, r, i)
            assert r % cfg.bn == 0 and i % (cfg.bk * cfg.splits) == 0, (m, r, i, cfg)


@pytest.mark.parametrize(
    "config",
    [
        BlockConfig(bm=16, bn=16, bk=32, splits=4),  # split-K, I padded 100 -> 128
        BlockConfig(bm=16, bn=16, bk=64, splits=1, dot="bfloat16"),
        BlockConfig(bm=32, bn=32, bk=32, splits=2, dot="bfloat16"),
        BlockConfig(bm=3, bn=16, bk=32, splits=2, dot="reduce"),
    ],
)
def test_pallas_explicit_configs(config):
    x, packed = _random_inputs(11, 3, 100, 48)
    _assert_same(x, packed, config=config)


@pytest.mark.parametrize("m,i,o", [(1, 256, 260), (8, 100, 48)])
def test_pallas_reduce_mode(m, i, o):
    x, packed = _random_inputs(13 + m, m, i, o)
    _assert_same(x, packed, config=BlockConfig(bm=m, bn=16, bk=64, splits=2, dot="reduce"))


def test_pallas_under_jit():
    x, packed = _random_inputs(17, 5, 100, 48)
    got = jax.jit(lambda a, b: ternary_matmul_pallas(a, b))(x, packed)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ternary_matmul_xla(x, packed)))


def test_pallas_through_dispatcher():
    # On CPU the dispatcher passes no interpret flag, so this only works if the kernel picks
    # interpret mode itself (compiled Pallas raises on the CPU backend).
    x, packed = _random_inputs(19, 3, 100, 260)
    got = kernels.ternary_matmul(x, packed, kernel="pallas")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ternary_matmul_xla(x, packed)))


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_pallas_bitlinear_equals_xla_policy(compute):
    key_w, key_x = jax.random.split(jax.random.PRNGKey(0))
    leaf = pack_weights(jax.random.normal(key_w, (48, 100), jnp.float32))
    x = jax.random.normal(key_x, (2, 3, 100), jnp.float32).astype(compute)
    y_pallas = bitlinear(x, leaf, Policy(compute_dtype=compute, kernel="pallas"))
    y_xla = bitlinear(x, leaf, Policy(compute_dtype=compute, kernel="xla"))
    assert y_pallas.shape == (2, 3, 48) and y_pallas.dtype == jnp.dtype(compute)
    np.testing.assert_array_equal(np.asarray(y_pallas), np.asarray(y_xla))


def test_pallas_rejects_bad_inputs():
    x, packed = _random_inputs(23, 2, 32, 8)
    with pytest.raises(ConfigError, match="int8"):
        ternary_matmul_pallas(x.astype(jnp.int32), packed)
    with pytest.raises(ConfigError, match="I="):
        ternary_matmul_pallas(x[:, :16], packed)
    with pytest.raises(ConfigError, match=r"\[M, I\]"):
        ternary_matmul_pallas(x[None], packed)
    with pytest.raises(ConfigError, match="not both"):
        ternary_matmul_pallas(x, packed, variant="gemv", config=BlockConfig(16, 16, 32))
    with pytest.raises(ConfigError, match="at most 8 rows"):
        x9, p9 = _random_inputs(29, 9, 32, 8)
        ternary_matmul_pallas(x9, p9, config=BlockConfig(8, 16, 32, dot="reduce"))
    with pytest.raises(ConfigError, match="power of two"):
        BlockConfig(bm=24, bn=16, bk=32)
    with pytest.raises(ConfigError, match="dot="):
        BlockConfig(bm=16, bn=16, bk=32, dot="int4")


@pytest.mark.skipif(ON_GPU, reason="checks the CPU refusal of compiled mode")
def test_pallas_compiled_mode_needs_gpu():
    x, packed = _random_inputs(31, 2, 32, 8)
    with pytest.raises(DeviceError, match="needs a GPU"):
        ternary_matmul_pallas(x, packed, interpret=False)


# jax/_src/lib/triton.py raises this when a Triton kernel must be compiled while lowering and no
# compiler is registered for the platform (the CUDA plugin registers one).
NO_TRITON_COMPILER = "does not have a Triton compilation handler"


@pytest.mark.skipif(ON_GPU, reason="on a GPU the parity tests compile the kernels for real")
@pytest.mark.parametrize(
    "m,rs,i,config",
    [
        (1, (640, 160, 160), 2560, None),  # reduce, split-K, fused 2B4T q/k/v, stacked
        (64, (1728, 1728), 2560, None),  # int8 MMA gemv, fused gate/up
        (512, (640,), 6912, None),  # gemm, down_proj
        (16, (8, 4), 48, BlockConfig(bm=16, bn=16, bk=32, dot="bfloat16")),  # masked loads
    ],
)
def test_pallas_lowers_to_triton_for_cuda(m, rs, i, config):
    # Cross-lowering for CUDA needs no GPU: it catches kernel ops without a Triton lowering rule
    # and non-power-of-two tensors before a GPU run (tests/test_gpu_aot.py compiles for a
    # compile-only H100 where jax >= 0.11 and the CUDA plugin are installed). jaxlib <= 0.10.2
    # emits the Triton IR in a `__gpu$xla.gpu.triton` custom call for XLA to compile; some
    # jaxlibs compile it to PTX while lowering, which needs the CUDA plugin's Triton compiler.
    config = config or pallas_gpu.default_config(m, rs, i)
    fn = jax.jit(lambda x, ws, layer: pallas_gpu._matmul_many(x, ws, layer, config=config,
                                                               interpret=False))
    traced = fn.trace(jax.ShapeDtypeStruct((m, i), jnp.int8),
                      tuple(jax.ShapeDtypeStruct((3, r, i), jnp.uint8) for r in rs),
                      jax.ShapeDtypeStruct((1,), jnp.int32))
    try:
        lowered = traced.lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if NO_TRITON_COMPILER not in str(e):
            raise
        pytest.skip(f"jax {jax.__version__} / jaxlib {jaxlib.__version__} compiles Triton to "
                    f"PTX while lowering and no CUDA plugin registered a Triton compiler ({e})")
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call_ffi") == 1, text
    # The stacked weights enter the kernel whole: no slice of them is taken outside it.
    assert "dynamic_slice" not in text


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_pallas_gpu_runs_compiled():
    x, packed = _random_inputs(37, 1, 2560, 2560)
    hlo = jax.jit(lambda a, b: ternary_matmul_pallas(a, b)).lower(x, packed).as_text()
    # jaxlib <= 0.10.2 emits Triton IR for XLA to compile; newer ones compile to PTX while lowering.
    assert "__gpu$xla.gpu.triton" in hlo or "triton_kernel_call" in hlo
    _assert_same(x, packed)


# ------------------------------------------------------------------------------------------------
# Stacked weights read in place, several weights in one call, masked (non-block) shapes


@pytest.mark.parametrize(
    "m,i,rs",
    [
        (1, 256, (16, 4, 4)),  # q/k/v-like, rows not a block multiple (masked loads)
        (3, 100, (12, 12)),  # gate/up-like, I not a block multiple
        (20, 256, (32, 32)),  # int8 MMA gemv
        (70, 64, (16,)),  # gemm
    ],
)
def test_pallas_many_reads_stacked_layer(m, i, rs):
    rng = np.random.default_rng(m + i)
    x = jnp.asarray(rng.integers(-128, 128, (m, i)), jnp.int8)
    stacks = [jnp.asarray(rng.integers(0, 256, (3, r, i)), jnp.uint8) for r in rs]
    for layer in (0, 2):
        got = pallas_gpu.ternary_matmul_many_pallas(x, stacks, jnp.int32(layer))
        for g, w in zip(got, stacks):
            np.testing.assert_array_equal(np.asarray(g),
                                          np.asarray(ternary_matmul_xla(x, w[layer])))


def test_pallas_dispatch_passes_the_layer():
    rng = np.random.default_rng(41)
    x = jnp.asarray(rng.integers(-128, 128, (2, 64)), jnp.int8)
    stacks = [jnp.asarray(rng.integers(0, 256, (2, r, 64)), jnp.uint8) for r in (8, 4)]
    got = kernels.ternary_matmul_many(x, stacks, kernel="pallas", layer=jnp.int32(1))
    for g, w in zip(got, stacks):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(ternary_matmul_xla(x, w[1])))
    one = kernels.ternary_matmul(x, stacks[0], kernel="pallas", layer=jnp.int32(0))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(ternary_matmul_xla(x, stacks[0][0])))


def test_default_config_fused_blocks_divide_every_weight():
    # 2B4T q/k/v (R = 640, 160, 160) and gate/up (1728, 1728): one bn for all, no masking.
    for rs in [(640, 160, 160), (1728, 1728)]:
        for m in (1, 8, 64):
            cfg = pallas_gpu.default_config(m, rs, 2560)
            assert all(r % cfg.bn == 0 for r in rs) and 2560 % (cfg.bk * cfg.splits) == 0
            assert cfg.dot == ("reduce" if m <= 4 else "int8"), cfg
            # split-K partial sums stay under a quarter of the weight bytes
            rows = m if cfg.dot == "reduce" else cfg.bm
            assert cfg.splits == 1 or cfg.splits * rows * 4 * sum(rs) * 4 <= sum(rs) * 2560 / 4


# ------------------------------------------------------------------------------------------------
# kernel="auto" falls back to XLA when the Pallas kernel does not compile


def test_auto_falls_back_to_xla_with_one_warning(monkeypatch):
    from bitnet_jax.kernels import dispatch
    from bitnet_jax.kernels.gpu import fallback

    def broken(*args, **kwargs):
        raise RuntimeError("Shared memory size limit exceeded (injected)")

    fallback.reset()
    monkeypatch.setattr(dispatch, "default_platform", lambda: "gpu")  # as if tracing for a GPU
    monkeypatch.setattr(fallback, "_compile_probe", broken)
    x, packed = _random_inputs(43, 3, 100, 48)
    with pytest.warns(RuntimeWarning, match="XLA path") as record:
        got = kernels.ternary_matmul(x, packed, kernel="auto")
        x2, packed2 = _random_inputs(47, 5, 64, 16)
        got2 = kernels.ternary_matmul(x2, packed2, kernel="auto")
        q = jnp.zeros((1, 1, 4, 16), jnp.float32)
        cache = jnp.zeros((2, 1, 2, 32, 16), jnp.float32)
        assert kernels.attention_kernel("auto", q, cache) == "xla"
    assert len([w for w in record if "XLA path" in str(w.message)]) == 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ternary_matmul_xla(x, packed)))
    np.testing.assert_array_equal(np.asarray(got2), np.asarray(ternary_matmul_xla(x2, packed2)))
    assert kernels.choose_kernel("pallas") == "pallas"  # an explicit choice is never replaced
    fallback.reset()


# ------------------------------------------------------------------------------------------------
# Cached attention over the stacked KV cache (gpu/attention.py), interpret mode on CPU


def _attention_reference(q, ck, cv, layer, rows, pos):
    """Plain numpy causal GQA softmax attention (float64) over the visible positions."""
    bq, t, n, h = q.shape
    g = n // ck.shape[2]
    out = np.zeros(q.shape, np.float64)
    for i in range(bq):
        for tt in range(t):
            end = pos[i] + tt + 1
            for j in range(n):
                keys = ck[layer, rows[i], j // g, :end].astype(np.float64)
                vals = cv[layer, rows[i], j // g, :end].astype(np.float64)
                s = keys @ q[i, tt, j].astype(np.float64) / np.sqrt(h)
                p = np.exp(s - s.max())
                out[i, tt, j] = (p / p.sum()) @ vals
    return out


@pytest.mark.parametrize(
    "bq,t,n,k,h,s,b,dtype,tol",
    [
        (2, 1, 4, 2, 16, 32, 3, "float32", 1e-5),  # decode, rows of other cache rows
        (1, 5, 4, 2, 8, 40, 1, "float32", 1e-5),  # prefill chunk, odd S
        (3, 3, 6, 3, 16, 64, 4, "bfloat16", 2e-2),  # bf16 cache, G = 2
        (1, 20, 4, 1, 16, 128, 1, "float32", 1e-5),  # T·G = 80 > one query block
        (2, 2, 4, 2, 96, 32, 2, "float32", 1e-5),  # H = 96 (large): padded to 128, masked
    ],
)
def test_cached_attention_pallas_matches_reference(bq, t, n, k, h, s, b, dtype, tol):
    from bitnet_jax.kernels.gpu.attention import cached_attention_pallas

    rng = np.random.default_rng(bq * 100 + t)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    q = cast(rng.standard_normal((bq, t, n, h)))
    ck, cv = (cast(rng.standard_normal((2, b, k, s, h))) for _ in range(2))
    rows = rng.integers(0, b, bq).astype(np.int32)
    pos = rng.integers(0, s - t + 1, bq).astype(np.int32)
    from bitnet_jax.kernels.gpu.attention import usable

    # On a GPU the compiled kernel runs where its shape rules allow, interpret mode elsewhere.
    interpret = None if usable(q.shape, ck.shape) else True
    got = cached_attention_pallas(q, ck, cv, jnp.int32(1), jnp.asarray(rows), jnp.asarray(pos),
                                  interpret=interpret)
    assert got.shape == q.shape and got.dtype == q.dtype
    f32 = lambda a: np.asarray(a.astype(jnp.float32))  # noqa: E731
    want = _attention_reference(f32(q), f32(ck), f32(cv), 1, rows, pos)
    np.testing.assert_allclose(f32(got), want, atol=tol, rtol=tol)


def test_cached_attention_kernel_choice():
    from bitnet_jax.kernels.gpu import attention as gpu_attention

    assert gpu_attention.usable((1, 1, 20, 128), (30, 1, 5, 1024, 128))
    assert gpu_attention.usable((1, 1, 16, 96), (24, 1, 16, 2048, 96))  # H padded to 128
    assert not gpu_attention.usable((1, 1, 4, 8), (2, 1, 2, 40, 8))  # S = 40: not 16-blocked
    assert kernels.attention_kernel("xla", jnp.zeros((1, 1, 4, 16)),
                                    jnp.zeros((2, 1, 2, 32, 16))) == "xla"
    q = jnp.zeros((1, 1, 4, 16), jnp.float32)
    assert kernels.attention_kernel("pallas", q, jnp.zeros((2, 1, 2, 32, 16))) == "pallas"
    # An int8-row cache (model/cache.py) runs XLA's attention: the GPU kernels read float rows.
    int8 = jnp.zeros((2, 1, 2, 32, 16 + 4), jnp.int8)
    assert kernels.attention_kernel("pallas", q, int8) == "xla"
    assert not kernels.fused_decode("pallas", jnp.float32, 1, [], int8, 4)


# ------------------------------------------------------------------------------------------------
# Bytes and kernels of a compiled program (kernels/gpu/hlo.py), on a hand-written HLO module in
# the text format of XLA:GPU's optimized HLO (benchmarks/gpu_aot.py reads real ones)

_HLO = r'''HloModule jit_step, is_scheduled=true

%fused_slice (p0: u8[4,8,16], p1: s32[]) -> u8[8,16] {
  %p0 = u8[4,8,16]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = u8[1,8,16]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,8,16}
}

%fused_update (p0: f32[4,2,32], p1: f32[1,2,32], p2: s32[]) -> f32[4,2,32] {
  %p0 = f32[4,2,32]{2,1,0} parameter(0)
  %p1 = f32[1,2,32]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[4,2,32]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %z, %z)
}

%layer_body (t: (s32[], f32[4,2,32], u8[4,8,16])) -> (s32[], f32[4,2,32], u8[4,8,16]) {
  %t = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %c = f32[4,2,32]{2,1,0} get-tuple-element(%t), index=1
  %w = u8[4,8,16]{2,1,0} get-tuple-element(%t), index=2
  %slice = u8[1,8,16]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %new = f32[1,2,32]{2,1,0} custom-call(%w, %i), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "ternary_matmul_reduce_x1", serialized_metadata = "{\22bytes_accessed\22: \22200\22, \22kernel\22: \22ternary_matmul\22}"}
  %upd = f32[4,2,32]{2,1,0} fusion(%c, %new, %i), kind=kLoop, calls=%fused_update
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}) tuple(%next, %upd, %w)
}

%layer_cond (t: (s32[], f32[4,2,32], u8[4,8,16])) -> pred[] {
  %t = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%greedy (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %neg = f32[8]{0} negate(%a)
}

%sampled (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %e = f32[8]{0} exponential(%a)
  ROOT %l = f32[8]{0} log(%e)
}

%step_body (s: (s32[], f32[4,2,32], u8[4,8,16], pred[], f32[8])) -> (s32[], f32[4,2,32], u8[4,8,16], pred[], f32[8]) {
  %s = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}, pred[], f32[8]{0}) parameter(0)
  %c = f32[4,2,32]{2,1,0} get-tuple-element(%s), index=1
  %w = u8[4,8,16]{2,1,0} get-tuple-element(%s), index=2
  %z = s32[] constant(0)
  %init = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}) tuple(%z, %c, %w)
  %loop = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}) while(%init), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"4"},"known_init_step":{"init":"0","step":"1"}}
  %p = pred[] get-tuple-element(%s), index=3
  %x = f32[8]{0} get-tuple-element(%s), index=4
  %y = f32[8]{0} conditional(%p, %x, %x), true_computation=%sampled, false_computation=%greedy
  %k = s32[] get-tuple-element(%s), index=0
  %c2 = f32[4,2,32]{2,1,0} get-tuple-element(%loop), index=1
  ROOT %r = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}, pred[], f32[8]{0}) tuple(%k, %c2, %w, %p, %y)
}

%step_cond (s: (s32[], f32[4,2,32], u8[4,8,16], pred[], f32[8])) -> pred[] {
  %s = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}, pred[], f32[8]{0}) parameter(0)
  %k = s32[] get-tuple-element(%s), index=0
  %m = s32[] constant(16)
  ROOT %lt = pred[] compare(%k, %m), direction=LT
}

ENTRY %main (cache: f32[4,2,32], w: u8[4,8,16], p: pred[], x: f32[8]) -> f32[4,2,32] {
  %cache = f32[4,2,32]{2,1,0} parameter(0)
  %w = u8[4,8,16]{2,1,0} parameter(1)
  %p = pred[] parameter(2)
  %x = f32[8]{0} parameter(3)
  %z = s32[] constant(0)
  %copy = f32[8]{0} copy(%x)
  %init = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}, pred[], f32[8]{0}) tuple(%z, %cache, %w, %p, %copy)
  %dec = (s32[], f32[4,2,32]{2,1,0}, u8[4,8,16]{2,1,0}, pred[], f32[8]{0}) while(%init), condition=%step_cond, body=%step_body
  ROOT %out = f32[4,2,32]{2,1,0} get-tuple-element(%dec), index=1
}
'''


def test_hlo_accounting_of_a_decode_step():
    from bitnet_jax.kernels.gpu import hlo

    program = hlo.Program(_HLO)
    costs = program.analyze()
    (low, high), (run_low, _) = costs["step"], costs["run"]
    # Per layer (x4, no condition with a known trip count): the slice fusion reads one layer
    # and the index (128 + 4) and writes the layer (128); the Pallas call its declared 200
    # bytes; the in-place update reads the new rows and the index and writes the rows
    # (256 + 4 + 256), not the whole cache; the add is a kernel too (s32: 4 + 4 + 4).
    per_layer = hlo.Cost(4, 128 + 4 + 128 + 200 + 256 + 4 + 256 + 12)
    greedy, sampled = hlo.Cost(1, 64), hlo.Cost(2, 128)
    condition = hlo.Cost(1, 4 + 4 + 1)  # the unknown-trip decode loop runs its condition
    assert low == per_layer.scaled(4) + greedy + condition
    assert high == per_layer.scaled(4) + sampled + condition
    assert run_low == low + hlo.Cost(1, 64)  # plus the copy outside the loop
    labels = {(k.label, k.count) for k in program.kernels}
    assert ("ternary_matmul_reduce_x1", 4) in labels and ("fused_slice", 4) in labels
    assert [k.count for k in program.loop_kernels()] == [4, 4, 4, 4]
