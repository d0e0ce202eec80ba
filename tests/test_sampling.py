"""Properties of the samplers in bitnet_jax/sampling.py, checked without a model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.errors import GenerationError
from bitnet_jax.runtime.sampling import (SamplingParams, apply_repetition_penalty, keep_mask,
                                         knob_arrays, sample, sample_checked)
from conftest import kernel_path, kernel_paths

V = 37
B = 512  # rows per sampler call: one compiled program serves most tests
_sample = jax.jit(sample)


def _knobs(b: int, **fields) -> dict:
    """Knob arrays for b rows; a field given as a list sets each row, a scalar sets all."""
    rows = []
    for r in range(b):
        row = {k: (v[r] if isinstance(v, (list, np.ndarray)) else v) for k, v in fields.items()}
        rows.append(SamplingParams(**{"temperature": 1.0, **row}))
    return {k: jnp.asarray(v) for k, v in knob_arrays(rows).items()}


def _logits(b: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((b, V))).astype(np.float32)


def _draw(logits, knobs, steps=None, seen=None):
    b = logits.shape[0]
    steps = jnp.arange(b, dtype=jnp.int32) if steps is None else steps
    seen = jnp.zeros((b, V), bool) if seen is None else seen
    return np.asarray(_sample(jnp.asarray(logits), seen, knobs, steps))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_greedy_equals_argmax():
    logits = _logits(B)
    tokens = _draw(logits, _knobs(B, temperature=0.0, top_k=3, top_p=0.5, min_p=0.2))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_top_k_never_picks_outside_top_k():
    b = B
    base = _logits(1)[0]
    ks = np.arange(b) % 5 + 1  # k = 1..5 per row
    tokens = _draw(np.tile(base, (b, 1)), _knobs(b, top_k=ks.tolist()))
    rank = np.argsort(np.argsort(-base))  # rank of each token id, 0 = most likely
    assert (rank[tokens] < ks).all()
    assert len(set(tokens[ks == 5].tolist())) > 1  # it does sample, not just argmax


def test_top_p_stays_inside_the_nucleus():
    b = B
    base = _logits(1, seed=1)[0]
    p = 0.6
    tokens = _draw(np.tile(base, (b, 1)), _knobs(b, top_p=p))
    probs = _softmax(base)
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < p].tolist())
    assert set(tokens.tolist()) <= nucleus
    assert len(set(tokens.tolist())) > 1


def test_keep_mask_is_the_smallest_set_reaching_top_p():
    logits = np.sort(_logits(8, seed=2), axis=-1)[:, ::-1].copy()
    top_p = np.linspace(0.1, 0.95, 8).astype(np.float32)
    keep = np.asarray(keep_mask(jnp.asarray(logits), jnp.zeros(8, jnp.int32), jnp.asarray(top_p),
                                jnp.zeros(8, jnp.float32)))
    probs = _softmax(logits)
    for r in range(8):
        n = keep[r].sum()
        assert keep[r, :n].all() and not keep[r, n:].any()  # a prefix of the sorted order
        assert probs[r, :n].sum() >= top_p[r] - 1e-6
        assert probs[r, :n - 1].sum() < top_p[r]


def test_min_p_drops_unlikely_tokens():
    b = B
    base = _logits(1, seed=4, scale=1.0)[0]  # 5 of 37 tokens pass min_p=0.3
    min_p = 0.3
    tokens = _draw(np.tile(base, (b, 1)), _knobs(b, min_p=min_p))
    probs = _softmax(base)
    assert (probs[tokens] >= min_p * probs.max()).all()
    assert len(set(tokens.tolist())) > 1


def test_temperature_one_matches_softmax_frequencies():
    b = 8 * B
    base = np.array([1.0, 0.0, -1.0, 0.5, 2.0] + [-30.0] * (V - 5), np.float32)
    tokens = _draw(np.tile(base, (b, 1)), _knobs(b))
    freq = np.bincount(tokens, minlength=V) / b
    np.testing.assert_allclose(freq, _softmax(base), atol=0.03)


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = _logits(4, seed=4)
    seen = np.random.default_rng(5).random((4, V)) < 0.5
    penalty = jnp.array([1.5, 2.0, 1.2, 1.0], jnp.float32)
    out = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), penalty))
    np.testing.assert_array_equal(out[~seen], logits[~seen])
    lowered = seen[:3]
    assert (out[:3][lowered] < logits[:3][lowered]).all()
    np.testing.assert_array_equal(out[3], logits[3])  # penalty 1 is a no-op


def test_repetition_penalty_changes_the_greedy_choice():
    logits = np.zeros((1, V), np.float32)
    logits[0, 7], logits[0, 9] = 3.0, 2.0
    seen = np.zeros((1, V), bool)
    seen[0, 7] = True
    greedy = _knobs(1, temperature=0.0, repetition_penalty=2.0)
    assert _draw(logits, greedy, seen=jnp.asarray(seen))[0] == 9
    assert _draw(logits, _knobs(1, temperature=0.0))[0] == 7


def test_same_seed_and_step_give_the_same_token():
    logits = _logits(B, seed=6)
    knobs = _knobs(B, seed=list(range(B)), top_k=10)
    np.testing.assert_array_equal(_draw(logits, knobs), _draw(logits, knobs))
    other = _knobs(B, seed=list(range(100, 100 + B)), top_k=10)
    assert (_draw(logits, knobs) != _draw(logits, other)).any()


def test_a_row_samples_the_same_alone_or_beside_a_filtering_row():
    # Row 1 does not filter; in the batch the sort path runs for row 0's top-k. Same noise, so
    # row 1's token must not change (this is what makes batched generation equal single).
    logits = _logits(2, seed=7)
    for step in range(20):
        steps = jnp.array([step, step], jnp.int32)
        both = _draw(logits, _knobs(2, top_k=[3, 0], seed=[0, 11]), steps=steps)
        alone = _draw(logits[1:], _knobs(1, top_k=0, seed=11), steps=steps[1:])
        assert both[1] == alone[0]


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("seed", -1), ("temperature", float("nan")),
])
def test_invalid_sampling_params_raise(field, value):
    with pytest.raises(GenerationError, match=field):
        SamplingParams(**{field: value})


def _greedy_cases():
    """(logits [B, V], seen, penalties): random rows, NaN and inf, every logit -inf, ties
    (the first maximum wins), ties made by the penalty, one row, and a vocabulary that is
    not a multiple of 8 (the kernel's scalar tail)."""
    rng = np.random.default_rng(3)
    cases = []
    for b, v in ((8, 32002), (5, 1000), (1, 7), (3, 61)):
        for kind in ("random", "nonfinite", "all_neg_inf", "ties", "penalty_ties"):
            x = (rng.standard_normal((b, v)) * 3).astype(np.float32)
            if kind == "nonfinite":
                x[0, v // 2] = np.nan
                x[0, v // 3] = np.nan
                x[-1, v - 1] = np.inf
                x[b // 2, 1] = -np.inf
            elif kind == "all_neg_inf":
                x[:] = -np.inf
            elif kind == "ties":
                x[:, 1::3] = x.max()
            elif kind == "penalty_ties":
                x = np.round(x)
            seen = rng.random((b, v)) < 0.3
            penalty = rng.choice([1.0, 1.3, 0.7, 2.0], b).astype(np.float32)
            cases.append(pytest.param(x, seen, penalty, id=f"{b}x{v}-{kind}"))
    return cases


@pytest.mark.parametrize("logits,seen,penalty", _greedy_cases())
def test_cpu_greedy_kernel_gives_the_xla_tokens(logits, seen, penalty):
    # The greedy choice and the finite check of a decode step through the CPU kernel
    # (kernels/cpu/greedy_cpu.h) are sampling's own: the argmax of the penalised logits (the
    # first maximum, or the first NaN) and all(isfinite) before the penalty, on every path.
    from bitnet_jax.kernels.cpu import ffi as cpu_ffi

    if jax.default_backend() != "cpu" or not cpu_ffi.available():
        pytest.skip(f"CPU FFI extension not available: {cpu_ffi.unavailable_reason()}")
    b = logits.shape[0]
    knobs = {k: jnp.asarray(v) for k, v in knob_arrays(
        [SamplingParams(temperature=0.0, repetition_penalty=float(p)) for p in penalty]).items()}
    want_tok = np.argmax(np.asarray(apply_repetition_penalty(jnp.asarray(logits),
                                                             jnp.asarray(seen),
                                                             jnp.asarray(penalty))), axis=-1)
    want_finite = np.isfinite(logits).all(axis=-1)
    for isa in kernel_paths(all_paths=False):
        with kernel_path(isa):
            for kernel in ("ffi", "xla"):
                tok, finite = jax.jit(sample_checked, static_argnames="kernel")(
                    jnp.asarray(logits), jnp.asarray(seen), knobs, jnp.zeros((b,), jnp.int32),
                    kernel=kernel)
                np.testing.assert_array_equal(np.asarray(tok), want_tok, err_msg=f"{isa} {kernel}")
                np.testing.assert_array_equal(np.asarray(finite), want_finite, err_msg=isa)


def test_cpu_greedy_kernel_refuses_bad_shapes():
    from bitnet_jax.kernels.cpu import ffi as cpu_ffi
    from bitnet_jax.kernels.cpu.greedy import greedy_ffi

    with pytest.raises(cpu_ffi.KernelError, match=r"logits \[B, V\], seen \[B, V\] and penalty"):
        greedy_ffi(jnp.zeros((2, 5)), jnp.zeros((2, 4), bool), jnp.ones((2,)))
