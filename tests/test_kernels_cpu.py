"""The CPU FFI kernels agree bit for bit with the XLA reference (kernels/cpu/ffi.py, library.py).

Every parity case runs on each kernel path this CPU supports (scalar, avx2, and avxvnni /
avx512vnni / amx where present), switching paths with `cpu_ffi.set_isa` on the same executable.
FFI tests skip, naming the reason, only when the extension is not built; with CI=true that skip
is a failure (test_extension_is_loaded and conftest.py), so a broken build cannot pass CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import kernels, quant
from bitnet_jax.model import bitlinear
from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.kernels.cpu import library
from bitnet_jax.kernels.xla import int8_matmul_xla, ternary_matmul_xla
from bitnet_jax.model.policy import Policy
from conftest import IN_CI, kernel_path, kernel_paths, random_packed

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the FFI kernel runs on JAX's CPU backend only"
)

_AVAILABLE = jax.default_backend() == "cpu" and cpu_ffi.available()
needs_ffi = pytest.mark.skipif(
    not _AVAILABLE, reason=f"CPU FFI extension not built: {cpu_ffi.unavailable_reason()}"
)


def test_extension_is_loaded():
    # The skips below hide a broken build; in CI (CI=true) a missing extension fails here.
    if not cpu_ffi.available():
        message = f"CPU FFI extension not built: {cpu_ffi.unavailable_reason()}"
        if IN_CI:
            pytest.fail(f"CI=true and the {message}")
        pytest.skip(message)
    assert cpu_ffi.isa() in cpu_ffi.supported_isas()
    assert cpu_ffi.supported_isas()[0] == "scalar"


def _operands(seed: int, m: int, i: int, o: int, extremes: bool = True):
    """Random int8 activations and packed weights."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (m, i), dtype=np.int8)
    if extremes and m >= 3:
        x[0] = -128  # the most negative sums the s16 accumulators must hold
        x[1] = 127
        x[2] = 0  # an all-zero token
    return jnp.asarray(x), jnp.asarray(random_packed(rng, (o // 4, i)))


def _numpy_reference(x, packed) -> np.ndarray:
    codes = (np.asarray(packed)[None] >> (2 * np.arange(4, dtype=np.uint8))[:, None, None]) & 3
    t = np.where(codes == 3, 0, codes.astype(np.int64) - 1).reshape(-1, packed.shape[1])
    return np.asarray(x).astype(np.int64) @ t.T


def _each_isa(fn):
    """fn() under every supported kernel path; returns {isa: result as numpy}."""
    out = {}
    for name in kernel_paths():
        with kernel_path(name):
            out[name] = np.asarray(fn())
    return out


# M x I x O cases: every M, I and O of interest at least once, odd sizes for the column tails
# (I % 32, I % 64) and the token remainders (M % 2, M % 4). M = 1 runs the GEMV, M >= 2 the
# GEMM on AVX-512 (ternary_gemm.h); O/4 = 3, 5, 9, 17 rows leave a remainder after its 4-row
# blocks, and O/4 = 256 is cut into work items across XLA's threads.
SHAPES = [
    (1, 32, 4), (1, 48, 12), (1, 100, 48), (1, 320, 1024), (1, 1000, 48),
    (2, 32, 12), (2, 1000, 1024), (3, 100, 4), (3, 320, 48),
    (7, 48, 1024), (7, 1000, 12), (8, 320, 12), (8, 100, 1024),
    (17, 32, 48), (17, 1000, 4), (64, 48, 48), (64, 320, 1024), (64, 100, 12),
    (2, 64, 20), (4, 200, 36), (5, 130, 68), (9, 64, 20), (16, 1000, 36), (33, 200, 68),
    (128, 96, 40), (512, 64, 20),
    (4, 8, 12), (9, 17, 20),  # I < 16 and I % 16 beside 4-token blocks (the AVX2 asm's tails)
    (64, 8, 20), (65, 130, 36),  # the same from M = 64 (AVX2: tiles unpacked once, + 1 token)
    (24, 130, 36), (29, 64, 20),  # avxvnni: 6-token blocks on packed rows (+ 0 or 5 tokens)
    (7, 8, 20),  # and with I < 16 (no whole 16 columns: the blocks' sums are zero)
    (48, 130, 36), (53, 17, 20),  # and on unpacked tiles
]


@needs_ffi
@pytest.mark.parametrize("m,i,o", SHAPES)
def test_ffi_matches_xla_exactly(m, i, o):
    x, packed = _operands(m * 1000 + i + o, m, i, o)
    expected = np.asarray(ternary_matmul_xla(x, packed))
    np.testing.assert_array_equal(expected, _numpy_reference(x, packed))
    fn = jax.jit(cpu_ffi.ternary_matmul_kernel)
    for name, got in _each_isa(lambda: fn(x, packed)).items():
        assert got.dtype == np.int32 and got.shape == (m, o), name
        np.testing.assert_array_equal(got, expected, err_msg=f"isa={name}")


@needs_ffi
@pytest.mark.parametrize("m", [16, 64])
@pytest.mark.parametrize("i", [4100, 65536, 70000])
def test_ffi_accumulator_extremes(i, m):
    # I = 4100 crosses the int16 widening block (512 columns) 8 times and leaves a tail; t = +1
    # against x = -128 is the most negative int16 partial sum. The AVX-512 GEMM keeps plane 3
    # (rows 12..15) x64: exact up to I = 65536, past it the row kernel runs (ternary_gemm.h);
    # so does the AMX GEMM, which 16 tokens reach (ternary_amx.h). 64 tokens run the AVX2
    # GEMM on unpacked tiles.
    x = np.zeros((m, i), np.int8)
    x[0::2], x[1::2] = -128, 127
    t = np.ones((16, i), np.int8)
    t[4:12] = -1
    packed = quant.pack_ternary(jnp.asarray(t))
    expected = x.astype(np.int64) @ t.T.astype(np.int64)
    results = _each_isa(lambda: cpu_ffi.ternary_matmul_kernel(jnp.asarray(x), packed))
    for name, got in results.items():
        np.testing.assert_array_equal(got, expected, err_msg=f"isa={name}")


@needs_ffi
def test_ffi_stacked_weights_at_a_layer_index():
    # [L, O/4, I] plus a traced layer index (model.apply's scan) reads matrix `layer` in place.
    rng = np.random.default_rng(12)
    stack = jnp.asarray(random_packed(rng, (3, 12, 200)))
    x = jnp.asarray(rng.integers(-128, 128, (5, 200), dtype=np.int8))
    fn = jax.jit(lambda a, w, l: cpu_ffi.ternary_matmul_kernel(a, w, l))
    disp = jax.jit(lambda a, w, l: kernels.ternary_matmul(a, w, kernel="xla", layer=l))
    for layer in range(3):
        expected = np.asarray(ternary_matmul_xla(x, stack[layer]))
        for name, got in _each_isa(lambda: fn(x, stack, jnp.int32(layer))).items():
            np.testing.assert_array_equal(got, expected, err_msg=f"isa={name} layer={layer}")
        np.testing.assert_array_equal(np.asarray(disp(x, stack, jnp.int32(layer))), expected)
    # Inside a scan over layer indices, as model.apply runs it.
    def body(c, l):
        return c, cpu_ffi.ternary_matmul_kernel(x, stack, l)
    _, ys = jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(3, dtype=jnp.int32)))()
    for layer in range(3):
        np.testing.assert_array_equal(np.asarray(ys[layer]),
                                      np.asarray(ternary_matmul_xla(x, stack[layer])))


@needs_ffi
@pytest.mark.parametrize("stacked", [False, True])
def test_ffi_several_weights_in_one_call(stacked):
    # q/k/v and gate/up share their input: one call, outputs of different widths, rows of all
    # weights split across the thread pool together (2560 x (1024 + 256 + 4) weights).
    rng = np.random.default_rng(21)
    shapes = [(256, 2560), (64, 2560), (1, 2560)]
    ws = [jnp.asarray(random_packed(rng, ((2,) if stacked else ()) + s)) for s in shapes]
    layer = jnp.int32(1) if stacked else None
    for m in (1, 3):
        x = jnp.asarray(rng.integers(-128, 128, (m, 2560), dtype=np.int8))
        expected = np.concatenate(
            [np.asarray(ternary_matmul_xla(x, w[1] if stacked else w)) for w in ws], axis=1)
        fn = jax.jit(lambda a, l, *w: jnp.concatenate(
            cpu_ffi.ternary_matmul_many_ffi(a, list(w), l), axis=1))
        for name, got in _each_isa(lambda: fn(x, layer, *ws)).items():
            np.testing.assert_array_equal(got, expected, err_msg=f"isa={name}")
        vm = jax.vmap(lambda a: kernels.ternary_matmul_many(a, ws, "ffi", layer))(x[:, None])
        np.testing.assert_array_equal(np.concatenate([np.asarray(g)[:, 0] for g in vm], 1),
                                      expected)


@needs_ffi
@pytest.mark.parametrize("m,i,v", [(1, 32, 5), (1, 1536, 1000), (2, 100, 37), (3, 1000, 64),
                                   (5, 64, 3), (8, 77, 129), (17, 320, 50), (2, 1536, 2003),
                                   (4, 130, 16), (8, 1536, 4100), (16, 200, 77),
                                   (64, 96, 24), (9, 20, 33),
                                   (1, 200, 9), (3, 330, 7)])  # avxvnni's 4 / 2 accumulators
def test_int8_head_kernel_matches_xla_exactly(m, i, v):
    rng = np.random.default_rng(m * 100 + i + v)
    x = rng.integers(-128, 128, (m, i), dtype=np.int8)
    w = rng.integers(-127, 128, (v, i), dtype=np.int8)  # row_int8 range: no -128
    if m >= 2:
        x[0], x[1] = -128, 127  # extremes against w = +-127 below
    w[0], w[-1] = 127, -127
    expected = x.astype(np.int64) @ w.T.astype(np.int64)
    np.testing.assert_array_equal(np.asarray(int8_matmul_xla(jnp.asarray(x), jnp.asarray(w))),
                                  expected)
    fn = jax.jit(cpu_ffi.int8_matmul_ffi)
    for name, got in _each_isa(lambda: fn(jnp.asarray(x), jnp.asarray(w))).items():
        assert got.dtype == np.int32 and got.shape == (m, v), name
        np.testing.assert_array_equal(got, expected, err_msg=f"isa={name}")


@needs_ffi
def test_int8_head_gemm_exact_when_its_biased_sums_wrap():
    # The M >= 2 GEMM sums (w + 128) * x (int8_gemm.h): past I = 65792 they wrap in int32, and
    # minus 128 * sum(x) modulo 2^32 must still be exact (true sums large but within int32).
    i = 70000
    x = np.full((2, i), -128, np.int8)
    x[1] = 127
    w = np.full((8, i), 127, np.int8)
    w[1::2] = -127
    expected = x.astype(np.int64) @ w.T.astype(np.int64)
    assert np.abs(expected).max() < 2**31
    fn = jax.jit(cpu_ffi.int8_matmul_ffi)
    for name, got in _each_isa(lambda: fn(jnp.asarray(x), jnp.asarray(w))).items():
        np.testing.assert_array_equal(got, expected, err_msg=f"isa={name}")


@needs_ffi
def test_int8_head_kernel_vmap_and_threads():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(-128, 128, (3, 2, 1536), dtype=np.int8))
    w = jnp.asarray(rng.integers(-127, 128, (4000, 1536), dtype=np.int8))  # split across threads
    expected = np.asarray(jax.vmap(int8_matmul_xla, (0, None))(x, w))
    got = jax.jit(jax.vmap(cpu_ffi.int8_matmul_ffi, (0, None)))(x, w)
    np.testing.assert_array_equal(np.asarray(got), expected)
    with pytest.raises(cpu_ffi.KernelError, match="same I"):
        cpu_ffi.int8_matmul_ffi(x[0], w[:, :8])


@needs_ffi
def test_ffi_valid_packing_roundtrip():
    # Codes made by pack_ternary (no code 3), as real checkpoints hold.
    rng = np.random.default_rng(7)
    t = jnp.asarray(rng.integers(-1, 2, (96, 200)), jnp.int8)
    x = jnp.asarray(rng.integers(-128, 128, (9, 200), dtype=np.int8))
    got = cpu_ffi.ternary_matmul_kernel(x, quant.pack_ternary(t))
    expected = np.asarray(x, np.int64) @ np.asarray(t, np.int64).T
    np.testing.assert_array_equal(np.asarray(got), expected)


@needs_ffi
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16, 64])
def test_ffi_gemm_buckets_multithreaded(m):
    # Decode/prefill M buckets on a weight cut into work items of whole 8-row blocks for XLA's
    # threads (ffi_runtime.h) and into tiles (isa.h), I = 2600 (K tail), O/4 = 647 (3 rows left).
    x, packed = _operands(100 + m, m, 2600, 2588)
    expected = np.asarray(ternary_matmul_xla(x, packed))
    fn = jax.jit(cpu_ffi.ternary_matmul_kernel)
    for name, got in _each_isa(lambda: fn(x, packed)).items():
        np.testing.assert_array_equal(got, expected, err_msg=f"isa={name} m={m}")


@needs_ffi
def test_ffi_large_decode_shape_multithreaded():
    # Big enough to be split across XLA's thread pool (ffi_runtime.h kMinParallelWork).
    x, packed = _operands(11, 2, 2560, 1024)
    expected = np.asarray(ternary_matmul_xla(x, packed))
    fn = jax.jit(cpu_ffi.ternary_matmul_kernel)
    for _ in range(3):  # repeated calls reuse the pool; each must complete its future
        np.testing.assert_array_equal(np.asarray(fn(x, packed)), expected)


@needs_ffi
def test_ffi_vmap_folds_batch_into_rows():
    x, packed = _operands(5, 12, 100, 48)
    xb = x.reshape(3, 4, 100)
    expected = np.asarray(jax.vmap(ternary_matmul_xla, (0, None))(xb, packed))
    got = jax.jit(jax.vmap(cpu_ffi.ternary_matmul_kernel, (0, None)))(xb, packed)
    np.testing.assert_array_equal(np.asarray(got), expected)
    # Batch axis not leading, and nested vmap.
    got = jax.vmap(cpu_ffi.ternary_matmul_kernel, (1, None), 1)(jnp.swapaxes(xb, 0, 1), packed)
    np.testing.assert_array_equal(np.asarray(jnp.swapaxes(got, 0, 1)), expected)
    x4 = x.reshape(3, 2, 2, 100)
    got = jax.vmap(jax.vmap(cpu_ffi.ternary_matmul_kernel, (0, None)), (0, None))(x4, packed)
    np.testing.assert_array_equal(np.asarray(got).reshape(12, 48), expected.reshape(12, 48))


@needs_ffi
def test_ffi_vmap_over_weights():
    rng = np.random.default_rng(9)
    x, _ = _operands(6, 3, 64, 8)
    pb = jnp.asarray(random_packed(rng, (4, 2, 64)))
    expected = np.asarray(jax.vmap(ternary_matmul_xla, (None, 0))(x, pb))
    got = jax.vmap(cpu_ffi.ternary_matmul_kernel, (None, 0))(x, pb)
    np.testing.assert_array_equal(np.asarray(got), expected)
    xb = jnp.stack([x, -x, x // 2, x])
    expected = np.asarray(jax.vmap(ternary_matmul_xla)(xb, pb))
    np.testing.assert_array_equal(np.asarray(jax.vmap(cpu_ffi.ternary_matmul_kernel)(xb, pb)),
                                  expected)


@needs_ffi
def test_dispatcher_selects_ffi():
    x, packed = _operands(8, 7, 320, 48)
    expected = np.asarray(ternary_matmul_xla(x, packed))
    for kernel in ("ffi", "auto"):
        got = jax.jit(lambda a, b, k=kernel: kernels.ternary_matmul(a, b, kernel=k))(x, packed)
        np.testing.assert_array_equal(np.asarray(got), expected)
    if jax.default_backend() == "cpu":
        assert kernels.choose_kernel() == "ffi"


@needs_ffi
def test_bitlinear_ffi_equals_xla():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 320)), jnp.float32)
    leaf = quant.pack_weights(jnp.asarray(rng.normal(size=(48, 320)), jnp.float32))
    y_ffi = jax.jit(lambda a: bitlinear.bitlinear(a, leaf, Policy(kernel="ffi")))(x)
    y_xla = jax.jit(lambda a: bitlinear.bitlinear(a, leaf, Policy(kernel="xla")))(x)
    assert y_ffi.shape == (2, 5, 48)
    np.testing.assert_array_equal(np.asarray(y_ffi), np.asarray(y_xla))


@needs_ffi
def test_gradients_through_packed_bitlinear_match_xla():
    # Integer operands get symbolic-zero tangents, so grad never enters the kernel; the
    # gradient w.r.t. scale and x (through the activation step) must equal the XLA path's.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    leaf = quant.pack_weights(jnp.asarray(rng.normal(size=(16, 64)), jnp.float32))

    def loss(scale, a, kernel):
        w = {"packed": leaf["packed"], "scale": scale}
        return jnp.sum(bitlinear.bitlinear(a, w, Policy(kernel=kernel)) ** 2)

    g_ffi = jax.grad(loss, argnums=(0, 1))(leaf["scale"], x, "ffi")
    g_xla = jax.grad(loss, argnums=(0, 1))(leaf["scale"], x, "xla")
    for a, b in zip(g_ffi, g_xla):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(g_ffi[0])) > 0


@needs_ffi
def test_isa_env_var_selects_initial_path():
    code = "from bitnet_jax.kernels.cpu import ffi; ffi.available(); print(ffi.isa())"
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, BITNET_JAX_CPU_ISA="scalar",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "scalar"


@needs_ffi
def test_set_isa_rejects_unknown_path():
    with pytest.raises(cpu_ffi.KernelError, match="not supported"):
        cpu_ffi.set_isa("avx9000")


def test_bad_operands_raise_kernel_error():
    with pytest.raises(cpu_ffi.KernelError, match="same I"):
        cpu_ffi.ternary_matmul_ffi(jnp.zeros((2, 8), jnp.int8), jnp.zeros((1, 9), jnp.uint8))
    with pytest.raises(cpu_ffi.KernelError, match="int8"):
        cpu_ffi.ternary_matmul_ffi(jnp.zeros((2, 8), jnp.float32), jnp.zeros((1, 8), jnp.uint8))


def test_ffi_refuses_non_cpu_backend(monkeypatch):
    monkeypatch.setattr(cpu_ffi.jax, "default_backend", lambda: "gpu")
    with pytest.raises(cpu_ffi.KernelError, match="CPU only"):
        cpu_ffi.ternary_matmul_ffi(jnp.zeros((2, 8), jnp.int8), jnp.zeros((1, 8), jnp.uint8))


def test_fallback_when_extension_missing(monkeypatch):
    def broken():
        raise OSError("simulated missing _ternary_cpu.so")

    fresh = dict(library._state, tried=False, lib=None, reason=None, warned=False)
    monkeypatch.setattr(library, "_state", fresh)
    monkeypatch.setattr(library, "_load_library", broken)
    x, packed = _operands(1, 3, 100, 12)
    expected = np.asarray(ternary_matmul_xla(x, packed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_ffi.available()
        got = kernels.ternary_matmul(x, packed, kernel="ffi")
        got2 = jax.jit(lambda a, b: kernels.ternary_matmul(a, b, kernel="ffi"))(x, packed)
        auto = kernels.choose_kernel()
    ours = [w for w in caught if "FFI kernel unavailable" in str(w.message)]
    assert len(ours) == 1 and "simulated missing" in str(ours[0].message)
    assert cpu_ffi.unavailable_reason() == "OSError: simulated missing _ternary_cpu.so"
    np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(np.asarray(got2), expected)
    if jax.default_backend() == "cpu":
        assert auto == "xla"
    with pytest.raises(cpu_ffi.KernelError, match="not available"):
        cpu_ffi.ternary_matmul_kernel(x, packed)


@needs_ffi
def test_refuses_extension_built_for_newer_jaxlib(monkeypatch):
    fresh = dict(library._state, tried=False, lib=None, reason=None, warned=False)
    monkeypatch.setattr(library, "_state", fresh)
    monkeypatch.setattr(library.jaxlib, "__version__", "0.4.0")
    with pytest.warns(RuntimeWarning, match="built against jaxlib"):
        assert not cpu_ffi.available()
    assert library._version_tuple("0.11.0rc1") == (0, 11)


def test_disable_env_var(monkeypatch):
    fresh = dict(library._state, tried=False, lib=None, reason=None, warned=False)
    monkeypatch.setattr(library, "_state", fresh)
    monkeypatch.setenv(library.DISABLE_ENV, "1")
    with pytest.warns(RuntimeWarning, match=library.DISABLE_ENV):
        assert not cpu_ffi.available()
