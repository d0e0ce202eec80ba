"""A BitLinear with its RMSNorm, residual add or gated activation in one CPU kernel call
(kernels/cpu/fused.py, cpu/fused_cpu.h; issue 16 item 2) against the XLA ops it replaces.

A user relies on the CPU kernels giving the XLA path's numbers: here every combination the
decoder layer uses (q/k/v with the input norm, o and down with a sub-norm and the residual,
gate/up with the post-attention norm and SiLU or relu²) is compared with
`fused_linear_composed`, which is model/layers.py's RMSNorm and activations (tied below), the
int8 quantisation and the packed product, on odd shapes and on sizes that split the call's
prologue over threads. Comparisons run with XLA's optimisations on, as programs run outside the
test-suite (conftest turns most of them off, which changes XLA's own float rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.kernels.cpu import fused
from bitnet_jax.model.layers import activation, rms_norm
from conftest import random_packed

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_ffi.available(),
    reason="the fused linear is a CPU FFI kernel (extension not built or not on CPU)",
)

L = 3


def _operands(seed: int, m: int, i: int, rows: list[int], stacked: bool):
    rng = np.random.default_rng(seed)
    shape = (L,) if stacked else ()
    packed = [jnp.asarray(random_packed(rng, (*shape, r, i))) for r in rows]
    scales = [jnp.asarray(rng.uniform(0.3, 2.0, shape), jnp.float32) for _ in rows]
    x = rng.standard_normal((m, i)).astype(np.float32) * rng.uniform(0.1, 20, (m, 1))
    gain = jnp.asarray(rng.uniform(0.2, 2.0, (*shape, i)), jnp.float32)
    residual = jnp.asarray(rng.standard_normal((m, 4 * rows[0])), jnp.float32)
    layer = jnp.int32(1) if stacked else None
    return jnp.asarray(x), packed, scales, gain, residual, layer


CASES = {  # name: (weights' packed rows, norm, residual, act)
    "qkv_norm": ([8, 4, 4], True, False, None),
    "o_sub_norm_residual": ([8], True, True, None),
    "o_residual": ([8], False, True, None),
    "gate_up_silu": ([12, 12], True, False, "silu"),
    "gate_up_relu2": ([12, 12], True, False, "relu2"),
    "gate_up_silu_no_norm": ([12, 12], False, False, "silu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("m,i,stacked", [(1, 64, True), (3, 100, True), (5, 96, False),
                                         (37, 200, True)])
def test_fused_linear_matches_the_composed_ops(xla_optimized, case, m, i, stacked):
    rows, with_norm, with_residual, act = CASES[case]
    x, packed, scales, gain, residual, layer = _operands(m * i, m, i, rows, stacked)
    norm = gain if with_norm else None
    res = residual if with_residual else None
    got = jax.jit(lambda x, g, r: fused.fused_linear_ffi(x, packed, scales, layer, eps=1e-5,
                                                         norm=g, residual=r, act=act))(x, norm, res)
    want = jax.jit(lambda x, g, r: fused.fused_linear_composed(
        x, tuple(packed), tuple(scales), cpu_ffi._layer_operand(layer), g, r, eps=1e-5,
        act=act))(x, norm, res)
    assert len(got) == len(want) == (1 if with_residual or act else len(rows))
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_kernel_reference_is_the_model_layers():
    """fused.py's RMSNorm and activations (kernels cannot import model) are layers.py's."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 48)) * 5, jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, (48,)), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(fused._rms_norm, static_argnums=2)(x, g, 1e-5)),
        np.asarray(jax.jit(rms_norm, static_argnums=2)(x, g, 1e-5)))
    for name in fused.ACTS:
        np.testing.assert_array_equal(np.asarray(fused._act(name, x)),
                                      np.asarray(activation(name, x)))


def test_fused_linear_silu_handles_extreme_values(xla_optimized):
    """The vectorised SiLU: large |gate| (exp overflow on the naive form), zeros and NaN."""
    x, packed, scales, _, _, layer = _operands(7, 2, 64, [16, 16], True)
    x = x.at[0].multiply(1e4).at[1, 3].set(jnp.nan)
    got, = fused.fused_linear_ffi(x, packed, scales, layer, act="silu")
    want, = fused.fused_linear_composed(x, tuple(packed), tuple(scales), layer, None, None,
                                        eps=1e-6, act="silu")
    got, want = np.asarray(got), np.asarray(want)
    assert np.isnan(got[1]).all() and np.isnan(want[1]).all()  # NaN in, NaN out, as in XLA
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * np.abs(want[0]).max())


def test_fused_linear_gradient_is_the_composed_ops():
    x, packed, scales, gain, residual, layer = _operands(3, 4, 64, [8], True)

    def loss(fn):
        return lambda x, g, s: jnp.sum(jnp.sin(fn(x, g, s)))

    def fused_fn(x, g, s):
        return fused.fused_linear_ffi(x, packed, [s], layer, norm=g, residual=residual)[0]

    def composed_fn(x, g, s):
        return fused.fused_linear_composed(x, tuple(packed), (s,), layer, g, residual,
                                           eps=1e-6, act=None)[0]

    got = jax.grad(loss(fused_fn), argnums=(0, 1, 2))(x, gain, scales[0])
    want = jax.grad(loss(composed_fn), argnums=(0, 1, 2))(x, gain, scales[0])
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(act="gelu"), "act='gelu'"),
    (dict(act="silu", n=1), "gate and up"),
    (dict(residual=jnp.zeros((2, 8)), n=2), "one weight and a residual"),
    (dict(residual=jnp.zeros((3, 32)), n=1), "one weight and a residual"),
    (dict(norm=jnp.ones((63,)), n=1), "gain"),
])
def test_fused_linear_refuses_what_it_cannot_compute(kw, match):
    n = kw.pop("n", 2)
    x, packed, scales, _, _, layer = _operands(5, 2, 64, [8] * n, True)
    with pytest.raises(cpu_ffi.KernelError, match=match):
        fused.fused_linear_ffi(x, packed, scales, layer, **kw)


def test_layer_scan_hands_the_norm_gains_whole(tiny_cfg, tiny_packed_params):
    """Where every projection is one fused kernel call, model.apply's layer scan passes the
    [L, D] norm gains whole and the kernel reads gain `layer` (a scan slice is one more XLA op
    per norm and layer); elsewhere they are sliced as before, and the XLA path of
    bitlinear_many still takes a whole stack (it slices gain `layer` itself)."""
    from bitnet_jax.kernels.stacked import scan_layers
    from bitnet_jax.model.bitlinear import NORMS, bitlinear_many, whole_norms
    from bitnet_jax.model.policy import Policy

    layers = tiny_packed_params["layers"]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, tiny_cfg.hidden_size)),
                    jnp.float32)
    assert whole_norms(layers, x, Policy(kernel="ffi")) == NORMS
    assert whole_norms(layers, x, Policy(kernel="xla")) == ()
    assert whole_norms(layers, x, Policy(kernel="ffi", compute_dtype="bfloat16")) == ()
    assert whole_norms(tiny_packed_params["embed_tokens"], x, Policy(kernel="ffi")) == ()
    mixed = {**layers, "mlp": {**layers["mlp"], "up_proj": jnp.zeros((2, 48, 32))}}  # latent
    assert whole_norms(mixed, x, Policy(kernel="ffi")) == ()

    seen = []

    def body(p, layer, carry):
        seen.append((p["input_layernorm"].shape, p["mlp"]["ffn_sub_norm"].shape,
                     p["self_attn"]["q_proj"]["scale"].shape))
        ws = [p["self_attn"]["q_proj"]]
        whole = bitlinear_many(carry, ws, Policy(kernel="xla"), norm=p["input_layernorm"])[0]
        sliced = bitlinear_many(carry, ws, Policy(kernel="xla"),
                                norm=p["input_layernorm"][layer])[0]
        return carry + 0 * jnp.sum(whole - sliced) + jnp.max(jnp.abs(whole - sliced))

    out = scan_layers(body, layers, x, whole=NORMS)
    d, f = tiny_cfg.hidden_size, tiny_cfg.intermediate_size
    assert seen == [((tiny_cfg.num_hidden_layers, d), (tiny_cfg.num_hidden_layers, f), ())]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))  # whole == sliced gain
