"""BitLinear in one CPU kernel call (bitnet_ternary_linear, cpu/quantize_cpu.h; issue 16 item 2).

The fused call quantises float32 activations per token, multiplies by the packed weights and
scales the int32 products, instead of XLA ops around the int32 kernel. It must give the same int8
codes, hence the same int32 products, as quantize_activations + ternary_matmul_many_ffi on every
ISA path, the float32 outputs to a few ulp of bitlinear_many's XLA scaling, and the model must
generate the same tokens with and without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import kernels
from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.model import bitlinear
from bitnet_jax.model.policy import Policy
from bitnet_jax.quant import quantize_activations
from conftest import kernel_path, kernel_paths, random_packed

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_ffi.available(),
    reason="the fused linear is a CPU FFI kernel (extension not built or not on CPU)",
)


def _packed(rng, rows: int, i: int, layers: int | None = None) -> jnp.ndarray:
    shape = (rows, i) if layers is None else (layers, rows, i)
    return jnp.asarray(random_packed(rng, shape))


def _activations(rng, m: int, i: int) -> jnp.ndarray:
    x = rng.standard_normal((m, i)).astype(np.float32) * rng.uniform(0.01, 30, (m, 1))
    if m >= 3:
        x[0] = 0.0  # absmax falls back to ACT_EPS
        x[1, :] = 1e-3
        x[1, i // 2] = -50.0  # one value far above the rest: the others quantise to 0
        x[2, ::2] = 2.5  # ties of x * 127 / absmax land exactly on .5 for some values
    return jnp.asarray(x.astype(np.float32))


@jax.jit
def _composed(x, layer, scales, packed):
    """The unfused sequence bitlinear_many runs otherwise: codes, int32 products, outputs."""
    x_q, step = quantize_activations(x)
    accs = cpu_ffi.ternary_matmul_many_ffi(x_q, packed, layer)
    return accs, [a.astype(jnp.float32) * (step * s) for a, s in zip(accs, scales)], step


def _check_against_composed(x, packed, scales, layer=None):
    fused = jax.jit(cpu_ffi.ternary_linear_many_ffi)(x, packed, scales, layer)
    accs, outs, step = _composed(x, layer, scales, packed)
    for y, acc, out, s in zip(fused, accs, outs, scales):
        y, acc, out = np.asarray(y), np.asarray(acc), np.asarray(out)
        assert y.dtype == np.float32 and y.shape == acc.shape
        # The same int32 products: each output divided by its step recovers them exactly.
        recovered = np.rint(y.astype(np.float64) / (np.asarray(step, np.float64) * float(s)))
        np.testing.assert_array_equal(recovered, acc)
        np.testing.assert_allclose(y, out, rtol=3e-7, atol=0)


SHAPES = [  # M, I, [O_j]: GEMV, GEMM blocks with token and column remainders, several weights
    (1, 64, [256]), (1, 100, [36, 12]), (3, 257, [64]), (5, 130, [68, 4]),
    (8, 1536, [1536, 512, 512]), (16, 4096, [1536]), (33, 200, [68]), (128, 96, [40]),
]


@pytest.mark.parametrize("m,i,os_", SHAPES)
def test_fused_linear_matches_quantize_then_matmul_on_every_isa(m, i, os_):
    rng = np.random.default_rng(m * 1000 + i)
    x = _activations(rng, m, i)
    packed = [_packed(rng, o // 4, i) for o in os_]
    scales = [jnp.float32(rng.uniform(0.05, 3.0)) for _ in os_]
    for isa in kernel_paths():
        with kernel_path(isa):
            _check_against_composed(x, packed, scales)


@pytest.mark.parametrize("where", ["all", "one vector lane", "tail"])
def test_a_nan_activation_makes_its_row_nan_on_every_isa(where):
    # As on the XLA path (jnp.max propagates NaN into the step): the engine relies on NaN logits
    # to end a request whose hidden state went non-finite. A SIMD max or std::max drops NaN, which
    # once quantised such a row against ACT_EPS into finite outputs.
    m, i = 4, 100  # 96 columns in 8 / 16-wide vectors, 4 in the scalar tail
    rng = np.random.default_rng(11)
    x = np.asarray(_activations(rng, m, i)).copy()
    row = {"all": np.s_[2, :], "one vector lane": np.s_[2, 37], "tail": np.s_[2, 98]}[where]
    x[row] = np.nan
    packed = [_packed(rng, 16, i)]
    scales = [jnp.float32(0.5)]
    want = np.asarray(_composed(jnp.asarray(x), None, scales, packed)[1][0])
    assert np.isnan(want[2]).all() and np.isfinite(np.delete(want, 2, axis=0)).all()
    for isa in kernel_paths():
        with kernel_path(isa):
            got = np.asarray(jax.jit(cpu_ffi.ternary_linear_many_ffi)(
                jnp.asarray(x), packed, scales, None)[0])
            assert np.isnan(got[2]).all(), isa
            np.testing.assert_allclose(np.delete(got, 2, axis=0), np.delete(want, 2, axis=0),
                                       rtol=3e-7, atol=0, err_msg=isa)


def test_fused_linear_reads_a_stacked_layer_and_folds_vmap_batches():
    rng = np.random.default_rng(7)
    x = _activations(rng, 6, 192)
    packed = [_packed(rng, 12, 192, layers=3), _packed(rng, 5, 192, layers=3)]
    scales = [jnp.float32(0.7), jnp.float32(1.3)]
    _check_against_composed(x, packed, scales, layer=jnp.int32(2))
    # [L] scales (the layer scan's "scales", kernels/stacked.py): entry `layer` is used.
    stacks = [jnp.asarray([0.1, 0.2, s], jnp.float32) for s in (0.7, 1.3)]
    for got, want in zip(cpu_ffi.ternary_linear_many_ffi(x, packed, stacks, jnp.int32(2)),
                         cpu_ffi.ternary_linear_many_ffi(x, packed, scales, jnp.int32(2))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # vmap over a batch axis of x folds into M (one call), as the int32 kernel does.
    xb = x.reshape(2, 3, 192)
    batched = jax.vmap(lambda a: cpu_ffi.ternary_linear_many_ffi(a, packed, scales, 1))(xb)
    flat = cpu_ffi.ternary_linear_many_ffi(x, packed, scales, 1)
    for b, f in zip(batched, flat):
        np.testing.assert_array_equal(np.asarray(b).reshape(f.shape), np.asarray(f))


def test_bitlinear_runs_one_fused_call_per_projection_group_on_cpu():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32))
    leaves = [{"packed": _packed(rng, 8, 64), "scale": jnp.float32(0.5)},
              {"packed": _packed(rng, 4, 64), "scale": jnp.float32(2.0)}]
    ffi, xla = Policy(kernel="ffi"), Policy(kernel="xla")
    fn = jax.jit(lambda x: bitlinear.bitlinear_many(x, leaves, ffi))
    hlo = fn.lower(x).compile().as_text()
    assert hlo.count('custom_call_target="bitnet_ternary_linear"') == 1
    assert "bitnet_ternary_matmul" not in hlo
    ref = jax.jit(lambda x: bitlinear.bitlinear_many(x, leaves, xla))(x)
    for got, want, leaf in zip(fn(x), ref, leaves):
        assert got.shape == want.shape == (2, 3, 4 * leaf["packed"].shape[0])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-7, atol=0)


def test_model_generates_the_same_tokens_with_and_without_the_fused_linear(monkeypatch,
                                                                        xla_optimized):
    from bitnet_jax.formats.loader import DEFAULT_MODEL, load_model
    from bitnet_jax.model import transformer
    from bitnet_jax.runtime.generate import generate
    from bitnet_jax.runtime.request import SamplingParams

    model = load_model(DEFAULT_MODEL)  # the bundled model: packed weights, CPU kernels
    prompts = [[1, 42, 117, 263, 31], [1, 90, 25]]
    kw = dict(max_new_tokens=12, sampling=SamplingParams(temperature=0.0), backend="cpu",
              ignore_eos=True)
    tokens = jnp.asarray([prompts[0]])

    def run():
        jax.clear_caches()
        hidden, _ = jax.jit(lambda p, t: transformer.apply(p, t, model.config, model.policy))(
            model.params, tokens)
        return [r.token_ids for r in generate(model, prompts, **kw)], np.asarray(hidden)

    fused_tokens, fused_hidden = run()
    asked = []
    monkeypatch.setattr(kernels, "linear_fusable", lambda *a, **k: asked.append(1) and False)
    plain_tokens, plain_hidden = run()
    assert asked  # traced again, without the fused call (not a cached program)
    assert fused_tokens == plain_tokens
    # The fused norm's sum of squares rounds differently from XLA's (whose vectorisation follows
    # the host: on an AVX-512 Xeon 18% of this hidden state moved by more than 1e-4), and where
    # that flips an int8 activation's rounding the outputs move by one quantisation step: most
    # elements agree to float rounding, none by more than a few such steps.
    diff = np.abs(fused_hidden - plain_hidden)
    assert np.median(diff) < 1e-5, np.median(diff)
    np.testing.assert_allclose(fused_hidden, plain_hidden, rtol=0, atol=1e-2)


def test_fused_linear_refuses_mismatched_weights():
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(cpu_ffi.KernelError, match="same I"):
        cpu_ffi.ternary_linear_many_ffi(x, [jnp.zeros((4, 32), jnp.uint8)], [1.0])
