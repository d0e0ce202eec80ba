"""The CPU kernels' threads (kernels/cpu/ffi_runtime.h): calls split across helper threads that
spin between calls and sleep when idle still give XLA's exact products, from concurrent callers
and after the helpers went to sleep.
"""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.kernels.xla import int8_matmul_xla, ternary_matmul_xla
from conftest import random_packed

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_ffi.available(),
    reason=f"CPU FFI extension not built: {cpu_ffi.unavailable_reason()}",
)


def _ternary_case(seed: int, m: int, i: int, o: int):
    """int8 activations and packed weights (codes 0..2) big enough to be split across threads."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (m, i), dtype=np.int8)
    return x, random_packed(rng, (o // 4, i))


def test_concurrent_callers_get_exact_products():
    # Four Python threads run jitted products at once, so parallel calls overlap and the helper
    # threads serve jobs of several callers; each result must equal XLA's, and none may hang.
    cases = [_ternary_case(s, m, 1536, 2048) for s, m in enumerate((1, 4, 8, 13))]
    expected = [np.asarray(ternary_matmul_xla(x, w)) for x, w in cases]
    head_x = np.random.default_rng(9).integers(-128, 128, (8, 512), dtype=np.int8)
    head_w = np.random.default_rng(10).integers(-127, 128, (6000, 512), dtype=np.int8)
    head_expected = np.asarray(int8_matmul_xla(head_x, head_w))
    ternary = jax.jit(cpu_ffi.ternary_matmul_kernel)
    head = jax.jit(cpu_ffi.int8_matmul_ffi)
    errors = []

    def run(k):
        try:
            x, w = cases[k]
            for _ in range(15):
                np.testing.assert_array_equal(np.asarray(ternary(x, w)), expected[k])
                np.testing.assert_array_equal(np.asarray(head(head_x, head_w)), head_expected)
        except Exception as e:  # noqa: BLE001 - reported below with the thread's case
            errors.append(f"case {k}: {e}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a kernel call never returned"
    assert not errors, errors


def test_calls_after_the_helpers_sleep():
    # A helper spins ~2 ms after its last job, then sleeps; the next call must wake it (or do
    # the work alone) and still be exact.
    x, w = _ternary_case(5, 8, 2048, 1024)
    expected = np.asarray(ternary_matmul_xla(x, w))
    fn = jax.jit(cpu_ffi.ternary_matmul_kernel)
    for pause in (0.0, 0.05, 0.0, 0.2):
        time.sleep(pause)
        np.testing.assert_array_equal(np.asarray(fn(x, w)), expected)
