"""Backend choice, parameter placement and the persistent compile cache (bitnet_jax/devices.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.runtime.compile_cache import compilation_cache_dir
from bitnet_jax.runtime.placement import (place_params, resolve_device,
                                resolve_policy)
from bitnet_jax.errors import DeviceError
from bitnet_jax.formats.base import Model
from bitnet_jax.model.policy import get_policy
from conftest import ROOT

ONLY_CPU = all(d.platform == "cpu" for d in jax.devices())


def _run_python(code: str, **env) -> str:
    """Run `code` in a fresh interpreter (XLA flags must be set before jax starts)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cpu_and_auto_resolve_to_a_device():
    assert resolve_device("cpu").platform == "cpu"
    if ONLY_CPU:
        assert resolve_device("auto").platform == "cpu"


@pytest.mark.skipif(not ONLY_CPU, reason="a GPU is visible; this checks the CPU-only message")
def test_gpu_request_without_gpu_says_how_to_install_cuda_jax():
    with pytest.raises(DeviceError, match=r'pip install -U "jax\[cuda13\]"'):
        resolve_device("gpu")


def test_unknown_backend_is_refused():
    with pytest.raises(DeviceError, match="'tpu' is unknown"):
        resolve_device("tpu")


def test_ensure_on_device_moves_only_what_is_elsewhere():
    out = _run_python("""
        import numpy as np, jax
        from bitnet_jax.runtime.placement import ensure_on_device
        d0, d1 = jax.devices("cpu")
        there = jax.device_put(np.zeros(2), d1)
        tree = {"a": jax.device_put(np.arange(3), d0), "b": np.ones(2), "c": [there]}
        moved = ensure_on_device(tree, d1)
        assert moved["a"].devices() == {d1} and moved["b"].devices() == {d1}
        assert moved["c"][0] is there
        assert np.asarray(moved["a"]).tolist() == [0, 1, 2]
        print("ok")
    """, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert out.strip() == "ok"


def test_params_are_placed_once_per_model_and_device(tiny_cfg, tiny_packed_params):
    model = Model(tiny_cfg, tiny_packed_params)
    cpu = resolve_device("cpu")
    policy = get_policy("cpu")
    placed = place_params(model, cpu, policy)
    assert place_params(model, cpu, policy) is placed
    assert place_params(Model(tiny_cfg, tiny_packed_params), cpu, policy) is not placed
    model.params = dict(tiny_packed_params)
    assert place_params(model, cpu, policy) is not placed  # new params, placed again


def test_placement_casts_float_leaves_but_keeps_packed_codes_and_scales(tiny_cfg,
                                                                        tiny_packed_params):
    placed = place_params(Model(tiny_cfg, tiny_packed_params), resolve_device("cpu"),
                          get_policy("gpu"))
    q = placed["layers"]["self_attn"]["q_proj"]
    assert placed["embed_tokens"].dtype == jnp.bfloat16
    assert placed["layers"]["input_layernorm"].dtype == jnp.bfloat16
    assert q["packed"].dtype == jnp.uint8 and q["scale"].dtype == jnp.float32


def test_policy_defaults_and_kernel_pinning(tiny_cfg):
    cpu = resolve_device("cpu")
    chosen = resolve_policy(cpu, None, get_policy("cpu"))
    assert chosen.compute_dtype == "float32" and chosen.kernel in ("xla", "ffi")
    assert resolve_policy(cpu, "gpu").compute_dtype == "bfloat16"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("BITNET_JAX_NO_CACHE", raising=False)
    monkeypatch.delenv("BITNET_JAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if sys.platform.startswith("linux"):
        assert compilation_cache_dir() == tmp_path / "bitnet_jax" / "xla"
    monkeypatch.setenv("BITNET_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("BITNET_JAX_NO_CACHE", "1")
    assert compilation_cache_dir() is None


def test_persistent_cache_is_enabled_when_the_engine_first_compiles(tmp_path):
    out = _run_python(f"""
        import jax
        import bitnet_jax
        from bitnet_jax.model.config import load_config
        from bitnet_jax.model.params import init_params, pack_params
        assert not jax.config.jax_compilation_cache_dir, "set at import"
        cfg = load_config({str(ROOT / "configs" / "tiny.json")!r})
        params = pack_params(init_params(cfg, jax.random.key(0), std=0.3), cfg)
        model = bitnet_jax.Model(cfg, params)
        bitnet_jax.generate(model, [[1, 2, 3]], max_new_tokens=1, backend="cpu")
        print(jax.config.jax_compilation_cache_dir)
    """, BITNET_JAX_CACHE_DIR=str(tmp_path / "xla"), BITNET_JAX_NO_CACHE="")
    assert out.strip() == str(tmp_path / "xla")
    assert any((tmp_path / "xla").iterdir())  # compiled programs were written
