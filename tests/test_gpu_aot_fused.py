"""The fused decode kernels compiled for an H100 / H200 without a GPU (see test_gpu_aot.py).

kernel="auto" on a GPU runs a decode step of up to 16 rows as five Pallas launches per layer
(model/fused.py): these tests compile every fused configuration the 2B4T and large shapes
produce, check that they take the stacked weights and the cache whole (read and, for the cache,
written in place: no copy kernel), count the launches of the engine's decode step, and check
the fallback to the composed path when a fused kernel does not compile.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from bitnet_jax.kernels.gpu import aot, hlo
# h100 and _full_optimization (autouse) are fixtures: imported, they apply here too.
from test_gpu_aot import (TRITON, _full_optimization, _linear_groups, _load_cfg,  # noqa: F401
                          _params, _policy, _program, _spec, fallback_warnings, h100,
                          weight_copies)

REASON = aot.unavailable_reason()
pytestmark = [pytest.mark.gpu_aot,
              pytest.mark.skipif(REASON is not None, reason=f"compile-only GPU: {REASON}"),
              pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")]


def _relu2(v):
    return jnp.square(jnp.maximum(v, 0))


@pytest.mark.parametrize("model", ["bitnet-b1.58-2B-4T", "bitnet_b1_58-large"])
@pytest.mark.parametrize("m,dtype", [(1, jnp.bfloat16), (8, jnp.bfloat16), (16, jnp.bfloat16),
                                     (1, jnp.float32)])
def test_fused_bitlinear_configs_compile(h100, model, m, dtype):
    from bitnet_jax.kernels.gpu.fused import fused_bitlinear

    cfg = _load_cfg(model)
    nl = cfg.num_hidden_layers
    groups = _linear_groups(cfg)
    extra = {"qkv": {}, "o": {"residual": True}, "gate_up": {"act": _relu2},
             "down": {"residual": True}}

    def step(xs, stacks, scales, gains, layer):
        outs = []
        for name, (i, rs) in groups.items():
            kw = dict(extra[name])
            if kw.pop("residual", False):
                kw["residual"] = xs["res"]
            outs.append(fused_bitlinear(xs[name], stacks[name], scales[name], layer,
                                        norm=gains[name], eps=1e-5, interpret=False, **kw))
        return outs

    xs = {name: _spec(h100, (m, i), dtype) for name, (i, rs) in groups.items()}
    xs["res"] = _spec(h100, (m, cfg.hidden_size), dtype)
    stacks = {name: [_spec(h100, (nl, r, i), jnp.uint8) for r in rs]
              for name, (i, rs) in groups.items()}
    scales = {name: [_spec(h100, (nl,), jnp.float32) for _ in rs] for name, (i, rs) in groups.items()}
    gains = {name: _spec(h100, (nl, i), dtype) for name, (i, rs) in groups.items()}
    program = _program(aot.compile_fn(step, xs, stacks, scales, gains, _spec(h100, (), jnp.int32),
                                      dev=h100))
    calls = [k for k in program.kernels if k.target == TRITON]
    assert len(program.kernels) == len(calls) == len(groups), [k.label for k in program.kernels]
    stacked = sorted(f"u8[{nl},{r},{i}]" for i, rs in groups.values() for r in rs)
    given = sorted(o.split("{")[0] for k in calls for o in k.operands if o.startswith("u8["))
    assert given == stacked  # whole stacks, read at the layer in place
    assert weight_copies(program, cfg) == []


@pytest.mark.parametrize("b,dtype", [(1, jnp.bfloat16), (16, jnp.bfloat16), (8, jnp.float32)])
def test_decode_attention_compiles_and_updates_the_cache_in_place(h100, b, dtype):
    import jax

    from bitnet_jax.kernels.gpu.decode_attention import decode_attention

    n, k, h, nl, s = 20, 5, 128, 30, 2048  # 2B4T
    cache = _spec(h100, (nl, b, k, s, h), dtype)

    def step(qkv, cos, sin, ck, cv, layer, pos):
        return decode_attention(qkv, cos, sin, ck, cv, layer, pos, heads=n, interpret=False)

    args = (_spec(h100, (b, (n + 2 * k) * h), dtype), _spec(h100, (b, h), jnp.float32),
            _spec(h100, (b, h), jnp.float32), cache, cache, _spec(h100, (), jnp.int32),
            _spec(h100, (b,), jnp.int32))
    with jax.default_device(h100):
        compiled = jax.jit(step, donate_argnums=(3, 4)).trace(*args).lower().compile()
    program = _program(compiled)
    assert [k.target for k in program.kernels] == [TRITON]  # no copy of the cache around it
    stack = f"[{nl},{b},{k},{s},{h}]"
    assert sum(stack in o for o in program.kernels[0].operands) == 2
    assert "output_to_operand_aliasing" in compiled.as_text()


@pytest.mark.parametrize("target", ["h100", "h200"])
def test_engine_decode_step_runs_five_launches_per_layer(target):
    from bitnet_jax.runtime import engine

    dev = aot.device(target)
    cfg = _load_cfg("bitnet-b1.58-2B-4T").replace(num_hidden_layers=4)
    policy = _policy("bfloat16", "auto")
    with aot.on(dev):
        lowered = engine.aot_lower(_params(cfg, policy, dev), cfg, policy, slots=1,
                                   context=256, device=dev)
    program = hlo.Program(aot.compile_lowered(lowered["decode"], dev).as_text())
    low, _ = program.analyze()["step"]
    labels = [k.label for k in program.kernels if k.target == TRITON]
    assert labels.count("decode_attention") == cfg.num_hidden_layers
    assert sum(lab.startswith("fused_bitlinear") for lab in labels) == 4 * cfg.num_hidden_layers
    # 5 per layer, plus the embedding, final norm, LM head and sampler (~25)
    assert low.kernels <= 5 * cfg.num_hidden_layers + 30, low.kernels
    assert weight_copies(program, cfg) == []


def test_auto_falls_back_to_the_composed_layers_when_a_fused_kernel_fails(h100, monkeypatch):
    from bitnet_jax.kernels.gpu import decode_attention
    from bitnet_jax.runtime import engine

    def broken(*args, **kwargs):
        raise NotImplementedError("injected lowering failure")

    cfg = _load_cfg("bitnet-b1.58-2B-4T").replace(num_hidden_layers=2)
    policy = _policy("bfloat16", "auto")
    monkeypatch.setattr(decode_attention, "_kernel", broken)
    with fallback_warnings() as record:
        with aot.on(h100):
            lowered = engine.aot_lower(_params(cfg, policy, h100), cfg, policy, slots=1,
                                       context=256, device=h100)
        compiled = aot.compile_lowered(lowered["decode"], h100)
    ours = [w for w in record if "does not compile" in str(w.message)]
    assert len(ours) == 1 and "injected" in str(ours[0].message), [str(w.message) for w in record]
    assert "decode layers one kernel per operation" in str(ours[0].message)
    labels = [k.label for k in _program(compiled).kernels if k.target == TRITON]
    assert labels and not any(lab.startswith(("fused_bitlinear", "decode_attention"))
                              for lab in labels)  # the composed Pallas path
