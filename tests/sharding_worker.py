"""Sharded runs for tests/test_sharding.py, in a process of its own.

The pytest process keeps one CPU device; virtual devices need JAX_NUM_CPU_DEVICES (or
XLA_FLAGS=--xla_force_host_platform_device_count) before JAX starts, so the test runs this file
with `sys.executable` and reads one JSON object per line from its stdout.

  python tests/sharding_worker.py meshes '{"meshes": [[1, 2], ...], "kernels": ["xla", "ffi"]}'
      every mesh x kernel x model (the tiny config, and a random one with kv heads < tp):
      forward logits, a cached prefill-into-a-slot + decode steps, and greedy `generate` when
      the engine takes a sharded model, each against the same model on one device.
  python tests/sharding_worker.py multihost '{"coordinator": "127.0.0.1:PORT", "process_id": 0,
      "num_processes": 2, "model": DIR, "data": 1, "tensor": 4}'
      one process of a multi-host run: load_model(mesh=...), forward, compare with one device.
"""

from __future__ import annotations

import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_disable_most_optimizations", True)  # as conftest.py: tiny programs

from bitnet_jax.model import transformer as T
from bitnet_jax.model.cache import init_cache
from bitnet_jax.model.config import load_config
from bitnet_jax.model.params import pack_params, param_shapes
from bitnet_jax.model.policy import get_policy
from bitnet_jax.model import sharding

TINY = "configs/tiny.json"
SEED = 7


def configs():
    """The tiny model (V=61: vocabulary replicated; K=2) and a wider random one with kv heads
    fewer than a tensor axis of 4 and an untied, vocabulary-split LM head."""
    tiny = load_config(TINY)
    wide = tiny.replace(vocab_size=96, hidden_size=64, intermediate_size=64,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                        tie_word_embeddings=False, hidden_act="silu")
    return {"tiny": tiny, "wide": wide}


def random_params(cfg, seed: int = SEED) -> dict:
    """Packed params drawn with numpy: weights N(0, 0.3²), gains 1 ± 0.2 (as conftest.py)."""
    gen = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))
    leaves = [jnp.asarray((1.0 if "norm" in jax.tree_util.keystr(p) else 0.0)
                          + (0.2 if "norm" in jax.tree_util.keystr(p) else 0.3)
                          * gen.standard_normal(s), jnp.float32) for p, s in flat]
    return pack_params(jax.tree_util.tree_unflatten(treedef, leaves), cfg)


def tokens_for(cfg, batch: int, t: int, seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(3, cfg.vocab_size, (batch, t)).astype(np.int32)


def compare(out, ref) -> dict:
    out, ref = sharding.host_value(out), np.asarray(ref)
    return {"max_dlogit": float(np.abs(out - ref).max()),
            "argmax_equal": bool((out.argmax(-1) == ref.argmax(-1)).all())}


# ------------------------------------------------------------------------------------------------
# Programs under test


def run_cached(params, cfg, policy, tokens, mesh=None):
    """Prefill each row into its own cache slot (one-row calls), then 3 greedy decode steps of
    every slot together; returns the list of logits of every call."""
    b, t = tokens.shape
    cache = init_cache(cfg, b, 32)
    if mesh is not None:
        cache = jax.device_put(cache, sharding.state_shardings(mesh, {"cache": cache})["cache"])

    @jax.jit
    def prefill(params, cache, toks, slot):
        h, cache = T.apply(params, toks, cfg, policy, cache=cache,
                           pos=jnp.zeros((1,), jnp.int32), slot=slot)
        return T.unembed(params, h[:, -1], cfg, policy), cache

    @jax.jit
    def step(params, cache, tok, pos):
        h, cache = T.apply(params, tok[:, None], cfg, policy, cache=cache, pos=pos)
        return T.unembed(params, h[:, 0], cfg, policy), cache

    outs = []
    for row in range(b):
        logits, cache = prefill(params, cache, jnp.asarray(tokens[row:row + 1]), jnp.int32(row))
        outs.append(sharding.host_value(logits))
    tok = jnp.asarray(np.concatenate(outs).argmax(-1), jnp.int32)
    for i in range(3):
        logits, cache = step(params, cache, tok, jnp.full((b,), t + i, jnp.int32))
        outs.append(sharding.host_value(logits))
        tok = jnp.asarray(outs[-1].argmax(-1), jnp.int32)
    return outs


def collectives(params, cfg, policy, tokens) -> dict:
    """Which collectives the compiled forward holds: the absmax of a split BitLinear input must
    be an all-reduce with `maximum`, the row-parallel product an s32 all-reduce."""
    hlo = jax.jit(T.forward, static_argnums=(2, 3)).lower(params, tokens, cfg,
                                                         policy).compile().as_text()
    bodies = dict(re.findall(r"^%?(\S+) .*?\{\n(.*?)\n\}", hlo, re.DOTALL | re.MULTILINE))
    kinds = set()
    for dtype, target in re.findall(r"= (\w+)\[[^\]]*\][^=]* all-reduce\(.*?to_apply=%?([\w.]+)",
                                    hlo):
        body = bodies.get(target, "")
        kinds.add(f"{dtype}:{'max' if 'maximum' in body else 'add' if 'add' in body else '?'}")
    return {"all_reduce": sorted(kinds), "all_gather": hlo.count(" all-gather(")}


# ------------------------------------------------------------------------------------------------
# Modes


def meshes(spec: dict) -> None:
    for name, cfg in configs().items():
        params = random_params(cfg)
        tokens = tokens_for(cfg, 8, 12)
        for kernel in spec["kernels"]:
            policy = get_policy("cpu").replace(kernel=kernel)
            fwd = jax.jit(T.forward, static_argnums=(2, 3))
            ref = np.asarray(fwd(params, tokens, cfg, policy))
            cached_too = kernel in spec.get("cached_kernels", spec["kernels"])
            ref_cached = run_cached(params, cfg, policy, tokens[:4]) if cached_too else None
            for dp, tp in spec["meshes"]:
                t0 = time.perf_counter()
                mesh = sharding.make_mesh(tensor=tp, data=dp)
                sp = sharding.shard_params(params, cfg, mesh)
                toks = jax.device_put(tokens, jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec("data")))
                row = {"model": name, "kernel": kernel, "data": dp, "tensor": tp,
                       "forward": compare(fwd(sp, toks, cfg, policy), ref)}
                if cached_too:
                    cached = run_cached(sp, cfg, policy, tokens[:4], mesh)
                    row["cached"] = {
                        "max_dlogit": max(float(np.abs(a - b).max())
                                          for a, b in zip(cached, ref_cached)),
                        "argmax_equal": all(bool((a.argmax(-1) == b.argmax(-1)).all())
                                            for a, b in zip(cached, ref_cached))}
                if spec.get("hlo") and (dp, tp) == (1, 2) and name == "wide":
                    row["collectives"] = collectives(sp, cfg, policy, tokens)
                row["seconds"] = round(time.perf_counter() - t0, 2)
                print(json.dumps(row), flush=True)
    if spec.get("generate"):
        generate(spec["generate"])
    reshard()
    refusal()


def reshard() -> None:
    """Params sharded for tp=2, re-sharded for tp=4 (blocks re-cut), and gathered back to the
    standard single-device form, which must equal the original bit for bit."""
    cfg = configs()["wide"]
    params = random_params(cfg)
    tokens = tokens_for(cfg, 2, 8)
    policy = get_policy("cpu")
    fwd = jax.jit(T.forward, static_argnums=(2, 3))
    two = sharding.shard_params(params, cfg, sharding.make_mesh(tensor=2))
    four = sharding.shard_params(two, cfg, sharding.make_mesh(tensor=4, data=2))
    back = sharding.unshard_params(four)
    same = jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)),
                                     params, back))
    print(json.dumps({"reshard": compare(fwd(four, tokens, cfg, policy),
                                         fwd(params, tokens, cfg, policy)),
                      "unshard_equal": same,
                      "q_proj": list(four["layers"]["self_attn"]["q_proj"]["packed"].shape)}),
          flush=True)


def generate(meshes_: list) -> None:
    """Greedy `generate` of the bundled model (real tokenizer) on each mesh, several prompts at
    once (slots split over "data"), against one device."""
    # Deferred: the engine and the loader are only needed for this part.
    import bitnet_jax as bj

    model = bj.load_model(bj.DEFAULT_MODEL)
    prompts = ["In the beginning", "And God said", "The LORD is my", "Blessed are the"]
    want = [r.text for r in bj.generate(model, prompts, max_new_tokens=12, temperature=0)]
    for dp, tp in meshes_:
        sharded_model = bj.shard(model, sharding.make_mesh(tensor=tp, data=dp))
        got = [r.text for r in bj.generate(sharded_model, prompts, max_new_tokens=12,
                                           temperature=0)]
        print(json.dumps({"generate": [dp, tp], "equal": got == want, "got": got,
                          "want": want}), flush=True)


def refusal() -> None:
    """tp=8 cannot split the tiny model's 4 query heads: one clear line, before any placement."""
    cfg = configs()["tiny"]
    try:
        sharding.shard_params(random_params(cfg), cfg, sharding.make_mesh(tensor=8))
        message = None
    except sharding.ShardingError as exc:
        message = str(exc)
    print(json.dumps({"refusal": message}), flush=True)


def multihost(spec: dict) -> None:
    jax.distributed.initialize(coordinator_address=spec["coordinator"],
                               num_processes=spec["num_processes"], process_id=spec["process_id"])
    # Deferred: imported after jax.distributed.initialize, like the CLI does.
    from bitnet_jax.formats.loader import load_model

    mesh = sharding.make_mesh(tensor=spec["tensor"], data=spec["data"])
    model = load_model(spec["model"], tokenizer=False, mesh=mesh)
    cfg, policy = model.config, get_policy("cpu")
    tokens = tokens_for(cfg, 4, 10)
    toks = jax.make_array_from_callback(tokens.shape, sharding.replicated(mesh),
                                        lambda idx: tokens[idx])
    out = jax.jit(T.forward, static_argnums=(2, 3))(model.params, toks, cfg, policy)
    with jax.default_device(jax.local_devices()[0]):  # the same model on one device
        single = load_model(spec["model"], tokenizer=False)
        ref = jax.jit(T.forward, static_argnums=(2, 3))(single.params, tokens, cfg, policy)
    row = {"process": jax.process_index(), "processes": jax.process_count(),
           "devices": jax.device_count(), "forward": compare(out, ref)}
    if spec.get("generate"):
        # Deferred: the engine is only needed for this part.
        from bitnet_jax.runtime.generate import generate as run_generate

        prompts = [list(map(int, row_)) for row_ in tokens[:2, :6]]
        got = [r.token_ids for r in run_generate(model, prompts, max_new_tokens=8,
                                                 temperature=0)]
        with jax.default_device(jax.local_devices()[0]):
            want = [r.token_ids for r in run_generate(single, prompts, max_new_tokens=8,
                                                      temperature=0, backend="cpu")]
        row["generate"] = {"equal": got == want, "got": got, "want": want}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    {"meshes": meshes, "multihost": multihost}[sys.argv[1]](json.loads(sys.argv[2]))
