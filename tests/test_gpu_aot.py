"""Compile for an H100 (and H200) without a GPU: every Pallas configuration, forward, the engine.

Runs where jax >= 0.11 and the CUDA 13 plugin are installed (Python >= 3.12: `.ci/gpu_aot.sh`
builds that venv and runs `pytest -m gpu_aot tests/test_gpu_aot.py` there); the default
Python 3.11 suite skips this file, saying so. Programs are built for the compile-only device of
bitnet_jax/kernels/gpu/aot.py and checked on their optimized HLO (kernels/gpu/hlo.py):

  * every Pallas ternary-matmul configuration `kernel="auto"` picks for the engine's matmul
    shapes (decode batches 1..64, prefill chunks 16..256; 2B4T, large and tiny shapes) and the
    cached-attention kernel compile to sm_90a and read the stacked weights / cache in place;
  * `bitnet_jax.forward` and the engine's prefill and decode programs (Pallas and XLA kernels,
    bf16 and f32, 1 and 64 slots) compile, and no kernel copies one layer of the stacked packed
    weights (the XLA path unpacks at most one layer at a time, never the whole stack);
  * kernel="auto" falls back to XLA, warning once, when the Pallas kernel fails to compile.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.kernels.gpu import aot, hlo

REASON = aot.unavailable_reason()
pytestmark = [pytest.mark.gpu_aot,
              pytest.mark.skipif(REASON is not None, reason=f"compile-only GPU: {REASON}"),
              # jax 0.11 warns at every Triton lowering (kernels/gpu/pallas.py: Backend)
              pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRITON = "__gpu$xla.gpu.triton"
DECODE_M = (1, 2, 4, 8, 16, 32, 64)  # engine batch buckets
PREFILL_M = (16, 32, 64, 128, 256)  # engine prefill chunks (one row)


@pytest.fixture(scope="module")
def h100():
    return aot.device("h100")


@pytest.fixture(autouse=True, scope="module")
def _full_optimization():
    # tests/conftest.py turns most XLA optimisations off to compile the suite's tiny programs
    # faster; the programs checked here must be the ones a GPU would run.
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def _spec(dev, shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=jax.sharding.SingleDeviceSharding(dev))


def _program(compiled) -> hlo.Program:
    program = hlo.Program(compiled.as_text())
    program.analyze()
    return program


def _linear_groups(cfg) -> dict:
    """The fused matmul groups of one layer: name -> (I, [R_j = O_j/4])."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    n, k = cfg.num_attention_heads, cfg.num_key_value_heads
    return {"qkv": (d, [n * h // 4, k * h // 4, k * h // 4]), "o": (n * h, [d // 4]),
            "gate_up": (d, [f // 4, f // 4]), "down": (f, [d // 4])}


def _weight_shapes(cfg) -> set:
    """(dtype, dims) of one layer's packed weights [R, I] and of the whole stacks [L, R, I]."""
    shapes = set()
    for i, rs in _linear_groups(cfg).values():
        for r in rs:
            shapes |= {("u8", (r, i)), ("u8", (1, r, i)), ("u8", (cfg.num_hidden_layers, r, i))}
    return shapes


def _arrays(shape_text: str):
    for dtype, dims in hlo._ARRAY.findall(shape_text):
        yield dtype, tuple(int(d) for d in dims.split(",") if d)


def weight_copies(program: hlo.Program, cfg) -> list:
    """Kernels (not the Pallas calls that read them in place) whose result is a copy of one
    layer of a stacked packed weight or of a whole stack, or an int8 unpack of every layer
    (an int8 KV cache [L, B, K, S, H + 4], which its writes update in place, is not one)."""
    layer_shapes = _weight_shapes(cfg)
    bad = []
    for k in program.kernels:
        if k.target == TRITON:
            continue
        for dtype, dims in _arrays(k.shape):
            kv_rows = len(dims) == 5 and dims[2] == cfg.num_key_value_heads \
                and dims[4] == cfg.head_dim + 4
            whole_unpack = (dtype == "s8" and len(dims) >= 3 and not kv_rows
                            and dims[0] == cfg.num_hidden_layers and math.prod(dims[1:]) > 4096)
            if (dtype, dims) in layer_shapes or whole_unpack:
                bad.append((k.name, k.target, k.label, k.shape[:120]))
    return bad


def _load_cfg(name: str):
    from bitnet_jax.model.config import load_config

    return load_config(CONFIGS / f"{name}.json")


# ------------------------------------------------------------------------------------------------
# Every Pallas configuration kernel="auto" can pick, compiled for sm_90a


@pytest.mark.parametrize("model", ["bitnet-b1.58-2B-4T", "bitnet_b1_58-large", "tiny"])
@pytest.mark.parametrize("m", DECODE_M + PREFILL_M[3:])
def test_every_auto_matmul_config_compiles(h100, model, m):
    from bitnet_jax.kernels.gpu import pallas

    cfg = _load_cfg(model)
    groups = _linear_groups(cfg)
    layers = cfg.num_hidden_layers

    def step(xs, stacks, layer):
        return [pallas.ternary_matmul_many_pallas(xs[name], stacks[name], layer)
                for name in groups]

    xs = {name: _spec(h100, (m, i), jnp.int8) for name, (i, rs) in groups.items()}
    stacks = {name: [_spec(h100, (layers, r, i), jnp.uint8) for r in rs]
              for name, (i, rs) in groups.items()}
    program = _program(aot.compile_fn(step, xs, stacks, _spec(h100, (), jnp.int32), dev=h100))
    calls = [k for k in program.kernels if k.target == TRITON]
    assert len(calls) == len(groups), [k.label for k in calls]
    configs = {pallas.default_config(m, rs, i) for i, rs in groups.values()}
    assert {c.dot for c in configs} == ({"reduce"} if m <= 4 else {"int8"})
    assert weight_copies(program, cfg) == []
    # The calls take the stacked [L, R, I] weights themselves (read at the layer, in place).
    stacked = sorted(f"u8[{layers},{r},{i}]" for i, rs in groups.values() for r in rs)
    given = sorted(o.split("{")[0] for k in calls for o in k.operands if o.startswith("u8["))
    assert given == stacked


@pytest.mark.parametrize("bq,t,dtype,heads", [
    (1, 1, jnp.bfloat16, (20, 5, 128)), (64, 1, jnp.bfloat16, (20, 5, 128)),
    (1, 256, jnp.bfloat16, (20, 5, 128)), (1, 1, jnp.float32, (20, 5, 128)),
    (64, 1, jnp.float32, (20, 5, 128)), (1, 256, jnp.float32, (20, 5, 128)),
    (8, 1, jnp.bfloat16, (16, 16, 96)), (1, 64, jnp.float32, (4, 2, 8))])  # large, tiny
def test_attention_kernel_compiles_and_reads_the_cache_in_place(h100, bq, t, dtype, heads):
    from bitnet_jax.kernels.gpu.attention import cached_attention_pallas

    n, k, h = heads
    layers, s = 30, 2048  # S != T·G, so shapes are unambiguous
    cache = _spec(h100, (layers, bq, k, s, h), dtype)
    args = (_spec(h100, (bq, t, n, h), dtype), cache, cache, _spec(h100, (), jnp.int32),
            _spec(h100, (bq,), jnp.int32), _spec(h100, (bq,), jnp.int32))
    program = _program(aot.compile_fn(cached_attention_pallas, *args, dev=h100))
    calls = [kern for kern in program.kernels if kern.target == TRITON]
    assert len(calls) == 1
    stack = f"[{layers},{bq},{k},{s},{h}]"
    assert sum(stack in o for o in calls[0].operands) == 2  # k and v, whole, read in place
    for kern in program.kernels:  # no other kernel reads or writes cache-sized data
        assert kern.target == TRITON or not any(stack in o for o in kern.operands), kern
        assert f"[{bq},{k},{s},{h}]" not in kern.shape and f"[1,{bq},{k},{s},{h}]" not in kern.shape


# ------------------------------------------------------------------------------------------------
# The public forward


def _policy(compute: str, kernel: str):
    from bitnet_jax.model.policy import Policy

    return Policy(param_dtype=compute, compute_dtype=compute, output_dtype="float32",
                  kernel=kernel)


def _params(cfg, policy, dev, lm_head="float"):
    from bitnet_jax.runtime.memory import param_specs

    return aot.abstract(param_specs(cfg, policy, lm_head=lm_head), dev)


@pytest.mark.parametrize("target,model,tokens", [
    ("h100", "tiny", (1, 8)), ("h200", "tiny", (2, 16)),
    ("h100", "bitnet-b1.58-2B-4T", (1, 16)), ("h200", "bitnet-b1.58-2B-4T", (2, 64))])
def test_forward_compiles_without_weight_copies(target, model, tokens):
    import bitnet_jax

    dev = aot.device(target)
    cfg = _load_cfg(model)
    if cfg.num_hidden_layers > 4:
        cfg = cfg.replace(num_hidden_layers=4)  # same per-layer program, faster compile
    policy = _policy("bfloat16", "auto")
    compiled = aot.compile_fn(bitnet_jax.forward, _params(cfg, policy, dev),
                              _spec(dev, tokens, jnp.int32), dev=dev, cfg=cfg, policy=policy)
    program = _program(compiled)
    assert any(k.target == TRITON for k in program.kernels), "kernel='auto' did not pick Pallas"
    assert weight_copies(program, cfg) == []


# ------------------------------------------------------------------------------------------------
# kernel="auto" falls back to XLA, warning once, when the Pallas kernel does not compile


@contextlib.contextmanager
def fallback_warnings():
    """Record every warning of the block, with kernel="auto"'s compile probes forgotten before
    and after (kernels/gpu/fallback.py remembers results and warns once per process)."""
    from bitnet_jax.kernels.gpu import fallback

    fallback.reset()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            yield record
    finally:
        fallback.reset()


def test_auto_falls_back_when_pallas_fails_to_compile(h100, monkeypatch):
    import bitnet_jax
    from bitnet_jax.kernels.gpu import pallas

    def too_big(m, r, i, variant=None):  # tiles far beyond the H100's 227 KB of shared memory
        return pallas.BlockConfig(bm=64, bn=1024, bk=4096, splits=1, num_warps=4, num_stages=4)

    cfg = _load_cfg("tiny")
    policy = _policy("bfloat16", "auto")
    monkeypatch.setattr(pallas, "default_config", too_big)
    with fallback_warnings() as record:
        compiled = aot.compile_fn(bitnet_jax.forward, _params(cfg, policy, h100),
                                  _spec(h100, (4, 32), jnp.int32), dev=h100, cfg=cfg,
                                  policy=policy)
    ours = [w for w in record if "XLA path" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in record]
    program = _program(compiled)
    assert all(k.target != TRITON for k in program.kernels)


# ------------------------------------------------------------------------------------------------
# The engine's programs (runtime/engine.py aot_lower), written last against the lead's engine


ENGINE_CASES = [(compute, kernel, slots) for compute in ("bfloat16", "float32")
                for kernel in ("pallas", "xla") for slots in (1, 64)]
_ENGINE: dict = {}


def _engine_programs(target: str, compute: str, kernel: str, slots: int) -> dict:
    """{"prefill", "decode", ...}: the tiny model's compiled engine programs (cached)."""
    from bitnet_jax.runtime import engine

    key = (target, compute, kernel, slots)
    if key not in _ENGINE:
        dev = aot.device(target)
        cfg = _load_cfg("tiny")
        policy = _policy(compute, kernel)
        with aot.on(dev):
            lowered = engine.aot_lower(_params(cfg, policy, dev), cfg, policy, slots=slots,
                                       context=cfg.max_position_embeddings, device=dev)
        _ENGINE[key] = {name: aot.compile_lowered(low, dev) for name, low in lowered.items()}
    return _ENGINE[key]


@pytest.mark.parametrize("compute,kernel,slots", ENGINE_CASES)
def test_engine_programs_compile(compute, kernel, slots):
    cfg = _load_cfg("tiny")
    programs = _engine_programs("h100", compute, kernel, slots)
    assert set(programs) >= {"prefill", "decode"}
    for name, compiled in programs.items():
        program = _program(compiled)
        has_pallas = any(k.target == TRITON for k in program.kernels)
        assert has_pallas == (kernel == "pallas"), (name, kernel)
        assert weight_copies(program, cfg) == [], name
        stats = compiled.memory_analysis()
        assert stats is not None and stats.temp_size_in_bytes >= 0


def test_engine_programs_compile_with_an_int8_kv_cache():
    # Policy(kv_cache_dtype="int8"): the Pallas matmuls stay, attention runs XLA's over the int8
    # rows (kernels.attention_kernel: the GPU kernels read float rows), and both programs
    # compile for sm_90a without copying a layer of the packed weights.
    from bitnet_jax.runtime import engine

    dev, cfg = aot.device("h100"), _load_cfg("tiny")
    policy = _policy("bfloat16", "pallas").replace(kv_cache_dtype="int8")
    with aot.on(dev):
        lowered = engine.aot_lower(_params(cfg, policy, dev), cfg, policy, slots=8,
                                   context=cfg.max_position_embeddings, device=dev)
    for name, low in lowered.items():
        program = _program(aot.compile_lowered(low, dev))
        assert any(k.target == TRITON for k in program.kernels), name
        assert weight_copies(program, cfg) == [], name


@pytest.mark.parametrize("target", ["h100", "h200"])
def test_engine_decode_step_is_one_loop_iteration(target):
    cfg = _load_cfg("tiny")
    compiled = _engine_programs(target, "bfloat16", "pallas", 64)["decode"]
    program = hlo.Program(compiled.as_text())
    costs = program.analyze()
    assert costs["step"] is not None, "the decode program has no decode loop"
    low, high = costs["step"]
    assert 0 < low.kernels <= high.kernels and 0 < low.bytes <= high.bytes
    # per run: the layer scan runs one fused q/k/v, o, gate/up and down call per layer
    triton = sum(k.count for k in program.kernels if k.target == TRITON)
    assert triton >= 4 * cfg.num_hidden_layers
    assert weight_copies(program, cfg) == []


# ------------------------------------------------------------------------------------------------
# Install (README, GPU): the [cuda] extra


def test_cuda_extra_installs_cuda_jax_on_python_312_only():
    import importlib.metadata
    import sys

    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in importlib.metadata.requires("bitnet-jax") or []]
    cuda = [r for r in reqs if r.marker is not None
            and r.marker.evaluate({"extra": "cuda", "python_version": "3.12"})
            and not r.marker.evaluate({"extra": "", "python_version": "3.12"})]
    assert [(r.name, sorted(r.extras)) for r in cuda] == [("jax", ["cuda13"])]
    (req,) = cuda
    # Older Pythons get nothing from the extra (no CUDA 13 wheels there); backend "gpu" then
    # says to use Python >= 3.12 (runtime/placement.py).
    assert not req.marker.evaluate({"extra": "cuda", "python_version": "3.11"})
    # This venv is what the extra installs, minus NVIDIA's runtime libraries.
    assert sys.version_info >= (3, 12)
    assert req.specifier.contains(jax.__version__)
    assert importlib.metadata.version("jax-cuda13-plugin") == jax.__version__


def test_readme_gpu_section_matches_the_code():
    from bitnet_jax.runtime import memory

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text.split("\n## GPU\n", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[cuda]"' in section and "Python >= 3.12" in section
    assert memory.ENV in section and "XLA_PYTHON_CLIENT_PREALLOCATE=false" in section
    for path in (".ci/gpu_aot.sh", "benchmarks/gpu_aot.py", "benchmarks/gpu_check.sh"):
        assert path in section and (root / path).exists(), path
    assert "--smoke" in (root / "benchmarks/gpu_check.sh").read_text()
    # The memory check the section describes refuses with a one-line, actionable error.
    cfg = _load_cfg("bitnet-b1.58-2B-4T")
    policy = _policy("bfloat16", "auto")
    params = memory.tree_bytes(memory.param_specs(cfg, policy))
    with pytest.raises(Exception, match="slots at context 4096") as info:
        memory.check_fit(cfg, policy, params_bytes=params, slots=64, context=4096,
                         device=aot.device("h100"), memory_limit=int(16e9))
    assert "\n" not in str(info.value)
