"""The AVX2 attention unit (kernels/cpu/attention_avx2.h) against the XLA attention.

tests/test_attention.py runs the kernel under the machine's best path and the portable one; on
an AVX-512 machine that never reaches the AVX2 unit, which the avx2 and avxvnni paths (and
AVX2-only CPUs) run for H = 64, 96 and 128. Here every supported path runs, with the unit's H
values, decode (T = 1, with its prefetches and the next unit's keys) and prefill chunks, and
visible lengths that are not multiples of 8 (the masked exp tail), and the tiled prefill units
(attention_prefill.h) that prefill chunks with H a multiple of 16 run on these paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.model.attention import cached_attention
from bitnet_jax.model.cache import attention_mask
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.policy import Policy
from conftest import LEAF_TOL, kernel_path, kernel_paths, random_cache

# (heads N, kv heads K, head_dim H, query rows Bq, new tokens T, cache length S, positions)
UNIT_CASES = [
    (4, 4, 64, 3, 1, 40, (0, 13, 39)),
    (16, 16, 96, 2, 1, 160, (144, 7)),
    (8, 2, 128, 2, 1, 24, (17, 23)),
    (4, 2, 96, 1, 5, 32, (9,)),
    (4, 4, 128, 1, 9, 20, (0,)),
    # the tiled prefill units (attention_prefill.h): several query blocks over several key
    # blocks (the large shape's heads), G = 4 (2B4T) in two rows, G = 3 (groups of 4 rows
    # plus single rows, a last block of one query), G = 32 > 16 (one query per unit) with
    # positions past the cache dropped
    (16, 16, 96, 1, 40, 64, (5,)),
    (20, 5, 128, 2, 7, 48, (30, 3)),
    (6, 2, 64, 1, 11, 24, (0,)),
    (32, 1, 64, 1, 3, 16, (14,)),
]


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("n,k,h,b,t,s,pos", UNIT_CASES)
def test_attention_unit_every_isa_matches_xla(n, k, h, b, t, s, pos, cache_dtype):
    if jax.default_backend() != "cpu" or not cpu_ffi.available():
        pytest.skip(f"CPU FFI extension not available: {cpu_ffi.unavailable_reason()}")
    cfg = ModelConfig(hidden_size=n * h, intermediate_size=8, num_hidden_layers=2,
                      num_attention_heads=n, num_key_value_heads=k, vocab_size=8)
    rng = np.random.default_rng(n + k + h + t + s)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)) * 2, jnp.float32)
    knew = jnp.asarray(rng.normal(size=(b, k, t, h)), jnp.float32)
    vnew = jnp.asarray(rng.normal(size=(b, k, t, h)), jnp.float32)
    cache = {"k": random_cache(rng, (2, b, k, s, h), cache_dtype),
             "v": random_cache(rng, (2, b, k, s, h), cache_dtype)}
    pos = jnp.asarray(pos, jnp.int32)
    mask = attention_mask(pos, t, s)

    def run(cache, kernel):
        return cached_attention(q, knew, vnew, cache, jnp.int32(1), pos, None, mask, cfg,
                                Policy(kernel=kernel))[0]

    run = jax.jit(run, static_argnums=1)
    expected = np.asarray(run(cache, "xla"))
    for isa in kernel_paths():
        with kernel_path(isa):
            np.testing.assert_allclose(np.asarray(run(cache, "ffi")), expected, rtol=1e-5,
                                       atol=LEAF_TOL, err_msg=isa)
