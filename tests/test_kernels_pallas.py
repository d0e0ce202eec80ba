"""Parity of the Pallas ternary matmul with the XLA reference (bitnet_jax/kernels/gpu/pallas.py).

On CPU every call runs in Pallas interpret mode (slow, hence the small shapes); on a GPU the
same tests run the compiled Triton kernels, because `interpret=None` resolves by backend.
Exactness is the contract: every comparison is bit for bit.
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
    "m,r,i,config",
    [
        (1, 640, 2560, None),  # gemv, split-K, 2B4T q/o projection
        (512, 1728, 2560, None),  # gemm, 2B4T up/gate
        (3, 16, 64, BlockConfig(bm=3, bn=16, bk=32, dot="reduce")),
        (16, 16, 64, BlockConfig(bm=16, bn=16, bk=32, dot="bfloat16")),
    ],
)
def test_pallas_lowers_to_triton_for_cuda(m, r, i, config):
    # Cross-lowering for CUDA needs no GPU: it catches kernel ops without a Triton lowering rule
    # and non-power-of-two tensors before a GPU run. jax 0.10.2 with jaxlib <= 0.10.2 emits the
    # Triton IR in a `__gpu$xla.gpu.triton` custom call for XLA to compile; with a newer jaxlib
    # it compiles the IR to PTX while lowering (sm_90 when no GPU is visible) into a
    # `triton_kernel_call_ffi` call, which needs the Triton compiler of the CUDA plugin.
    config = config or pallas_gpu.default_config(m, r, i)
    fn = jax.jit(lambda a, b: pallas_gpu._ternary_matmul(a, b, config=config, interpret=False))
    traced = fn.trace(
        jax.ShapeDtypeStruct((m, i), jnp.int8), jax.ShapeDtypeStruct((r, i), jnp.uint8)
    )
    try:
        lowered = traced.lower(lowering_platforms=("cuda",))
    except RuntimeError as e:
        if NO_TRITON_COMPILER not in str(e):
            raise
        pytest.skip(f"jax {jax.__version__} / jaxlib {jaxlib.__version__} compiles Triton to "
                    f"PTX while lowering and no CUDA plugin registered a Triton compiler ({e})")
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call_ffi") == 1, text


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_pallas_gpu_runs_compiled():
    x, packed = _random_inputs(37, 1, 2560, 2560)
    hlo = jax.jit(lambda a, b: ternary_matmul_pallas(a, b)).lower(x, packed).as_text()
    # jaxlib <= 0.10.2 emits Triton IR for XLA to compile; newer ones compile to PTX while lowering.
    assert "__gpu$xla.gpu.triton" in hlo or "triton_kernel_call" in hlo
    _assert_same(x, packed)
