"""GPU memory fit (bitnet_jax/runtime/memory.py), exercised on CPU through a memory limit.

The CPU device has no allocator statistics, so these tests set the budget with the
BITNET_JAX_MEMORY_LIMIT environment variable (or `memory_limit=`), as a user sharing a GPU would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.errors import DeviceError
from bitnet_jax.model.cache import init_cache
from bitnet_jax.model.params import pack_params, quantize_lm_head
from bitnet_jax.model.policy import Policy, get_policy
from bitnet_jax.runtime import memory

CPU = jax.devices("cpu")[0]


@pytest.fixture(autouse=True)
def _no_env_limit(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)


def test_param_specs_match_real_packed_params(tiny_cfg, tiny_params):
    packed = pack_params(tiny_params, tiny_cfg)
    specs = memory.param_specs(tiny_cfg, get_policy("cpu"))
    assert jax.tree.structure(specs) == jax.tree.structure(packed)
    for s, a in zip(jax.tree.leaves(specs), jax.tree.leaves(packed)):
        assert s.shape == a.shape and s.dtype == a.dtype
    assert memory.tree_bytes(specs) == sum(a.nbytes for a in jax.tree.leaves(packed))
    int8 = quantize_lm_head(packed, tiny_cfg)
    assert memory.tree_bytes(memory.param_specs(tiny_cfg, get_policy("cpu"), lm_head="int8")) \
        == sum(a.nbytes for a in jax.tree.leaves(int8))


@pytest.mark.parametrize("kv_dtype", [None, "bfloat16", "int8"])
def test_kv_cache_bytes_match_the_allocated_cache(tiny_cfg, kv_dtype):
    policy = Policy(kv_cache_dtype=kv_dtype)
    cache = jax.eval_shape(lambda: init_cache(tiny_cfg, 3, 48, policy.kv_cache))
    assert memory.kv_cache_bytes(tiny_cfg, policy, 3, 48) == memory.tree_bytes(cache)


@pytest.mark.parametrize("text,value", [("24GB", 24 * 10**9), ("8GiB", 8 * 2**30),
                                        ("512 MB", 512 * 10**6), ("1.5e9", 1_500_000_000),
                                        ("1000", 1000)])
def test_parse_bytes(text, value):
    assert memory.parse_bytes(text) == value


def test_parse_bytes_refuses_junk():
    with pytest.raises(DeviceError, match="not a size"):
        memory.parse_bytes("lots")


def test_cpu_without_a_limit_is_not_checked(tiny_cfg):
    report = memory.check_fit(tiny_cfg, get_policy("cpu"), params_bytes=10**15, slots=64,
                              context=4096, device=CPU)
    assert report["free"] is None and report["source"] == "unknown"


def test_fits_under_the_env_limit(tiny_cfg, monkeypatch):
    monkeypatch.setenv(memory.ENV, "1GB")
    report = memory.check_fit(tiny_cfg, get_policy("cpu"), params_bytes=1000, slots=4,
                              context=64, device=CPU, temp_bytes=500)
    assert report["source"] == memory.ENV and report["free"] == 10**9
    assert report["need"] == 1000 + 500 + memory.kv_cache_bytes(tiny_cfg, get_policy("cpu"), 4, 64)


def test_refusal_says_what_fits_and_that_fits(tiny_cfg, monkeypatch):
    policy = get_policy("cpu")
    per_slot = memory.kv_cache_bytes(tiny_cfg, policy, 1, 64)  # 2·L·K·S·H·4 bytes
    params, temp = 10_000, 2_000
    limit = params + temp + 5 * per_slot + per_slot // 2  # room for 5.5 slots at context 64
    monkeypatch.setenv(memory.ENV, str(limit))
    with pytest.raises(DeviceError) as info:
        memory.check_fit(tiny_cfg, policy, params_bytes=params, slots=8, context=64, device=CPU,
                         temp_bytes=temp)
    msg = str(info.value)
    assert "\n" not in msg
    assert "at most 5 slots at context 64" in msg
    fit_context = int(msg.split("or context ")[1].split()[0])
    assert fit_context % 16 == 0 and fit_context >= 16
    # The suggestions really fit, and one more slot would not.
    for slots, context in [(5, 64), (8, fit_context)]:
        memory.check_fit(tiny_cfg, policy, params_bytes=params, slots=slots, context=context,
                         device=CPU, temp_bytes=temp)
    with pytest.raises(DeviceError):
        memory.check_fit(tiny_cfg, policy, params_bytes=params, slots=6, context=64, device=CPU,
                         temp_bytes=temp)


def test_params_alone_too_big(tiny_cfg):
    with pytest.raises(DeviceError, match="params and programs alone do not fit"):
        memory.check_fit(tiny_cfg, get_policy("cpu"), params_bytes=10**6, slots=1, context=16,
                         device=CPU, memory_limit=10**5)


def test_params_already_on_device_are_not_counted_twice(tiny_cfg, monkeypatch):
    # A device's memory_stats count placed params in bytes_in_use; a budget counts them too.
    monkeypatch.delenv(memory.ENV, raising=False)
    kv = memory.kv_cache_bytes(tiny_cfg, get_policy("cpu"), 2, 32)

    class Gpu:
        def memory_stats(self):
            return {"bytes_limit": 10**12 + kv, "bytes_in_use": 10**12}

    report = memory.check_fit(tiny_cfg, get_policy("cpu"), params_bytes=10**12, slots=2,
                              context=32, device=Gpu(), params_on_device=True)
    assert report["need"] == kv and report["source"] == "memory_stats"
    with pytest.raises(DeviceError, match="params 1000.00 GB"):
        memory.check_fit(tiny_cfg, get_policy("cpu"), params_bytes=10**12, slots=2, context=32,
                         device=CPU, memory_limit=kv, params_on_device=True)


class _FakeXlaError(RuntimeError):
    pass


def test_out_of_memory_becomes_a_clear_error(tiny_cfg, monkeypatch):
    policy = get_policy("cpu")
    oom = _FakeXlaError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.0GiB.")
    err = memory.as_memory_error(oom, tiny_cfg, policy, slots=64, context=64, device=CPU)
    assert isinstance(err, DeviceError) and "\n" not in str(err)
    assert "fewer slots or a shorter context" in str(err)
    assert memory.as_memory_error(ValueError("shape mismatch"), tiny_cfg, policy, slots=1,
                                  context=16, device=CPU) is None
    # With a known budget the message is the fit check's: what would fit.
    monkeypatch.setenv(memory.ENV, str(memory.kv_cache_bytes(tiny_cfg, policy, 3, 64)))
    with pytest.raises(DeviceError, match="at most 3 slots at context 64") as info:
        with memory.memory_errors(tiny_cfg, policy, slots=64, context=64, device=CPU):
            raise oom
    assert info.value.__cause__ is oom
    with pytest.raises(ValueError, match="unrelated"):
        with memory.memory_errors(tiny_cfg, policy, slots=1, context=16, device=CPU):
            raise ValueError("unrelated")


def test_real_allocation_failure_is_recognised():
    # A real XLA:CPU out-of-memory: an allocation far beyond any machine.
    try:
        jnp.zeros((2**62,), jnp.uint8).block_until_ready()
    except Exception as e:  # noqa: BLE001 - whatever XLA raises must be recognised
        assert memory.is_out_of_memory(e), repr(e)
    else:
        pytest.fail("allocating 4 EiB did not fail")


def test_place_params_refuses_params_that_do_not_fit(tiny_cfg, tiny_packed_params, monkeypatch):
    from bitnet_jax.formats.base import Model
    from bitnet_jax.runtime.placement import place_params

    model = Model(tiny_cfg, tiny_packed_params)
    policy = get_policy("gpu")  # bf16 float leaves: counted as placed, not as stored
    need = memory.placed_bytes(model.params, policy)
    placed = place_params(model, CPU, policy)  # no limit on CPU: placed
    assert need == sum(a.nbytes for a in jax.tree.leaves(placed))
    monkeypatch.setenv(memory.ENV, str(need - 1))
    other = Model(tiny_cfg, tiny_packed_params)
    with pytest.raises(DeviceError, match="params and programs alone do not fit") as info:
        place_params(other, CPU, policy)
    assert "KV cache" not in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv(memory.ENV, str(need))
    place_params(other, CPU, policy)  # exactly enough
