"""Compile-only tensor parallelism on 8 GPUs: one decode step of a model shape, no GPU needed.

Builds 8 compile-only H100 (or H200) devices from an XLA target description
(kernels/gpu/aot.py, topology 1x1x8), shards the model's abstract params and decode state over
a tensor (or data) mesh with model/sharding.py, compiles the engine's decode program for one
step (chunk=1) and reports, per device: the params and KV-cache bytes, what one step reads, the
collectives one step runs (HLO while loops weighted by their known trip counts: the layer scan
runs its body L times), and the projected step time and tokens/s of the bandwidth model
(bytes / HBM bandwidth) plus ~5 µs per collective. One JSON line per configuration.

Needs jax >= 0.11 with the CUDA 13 plugin (.ci/gpu_aot.sh builds .venv312):
  .venv312/bin/python benchmarks/bench_tp_aot.py --config configs/Llama3-8B-1.58-100B-tokens.json
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.kernels.gpu import aot
from bitnet_jax.model.config import load_config
from bitnet_jax.model.params import init_params, pack_params
from bitnet_jax.model.policy import get_policy
from bitnet_jax.runtime import engine, sharding

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
COLLECTIVE_US = 5.0


def devices(target: str, n: int) -> list:
    aot.device(target)  # checks the environment and sets JAX_SKIP_CUDA_CONSTRAINTS_CHECK
    # Deferred: compile-only topologies need jax >= 0.11 with the CUDA plugin.
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(platform="cuda", topology_name="",
                                        target_config=aot.target_config(target),
                                        topology=f"1x1x{n}")
    return list(topo.devices)


def step_collectives(hlo: str) -> dict:
    """Collectives one run of the program executes: each computation's collectives times the
    number of times it runs (while bodies by their known_trip_count; unknown counts once)."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            comps[name] = []
        elif name is not None and line.strip() != "}":
            comps[name].append(line)
    counts: collections.Counter = collections.Counter()

    def visit(comp: str, times: int) -> None:
        for line in comps.get(comp, ()):
            op = re.search(r" = .*?\s([a-z][\w\-]*)\((?:%|\))", line)
            kind = op.group(1) if op else ""
            base = kind.removesuffix("-start")
            if base in COLLECTIVES and not kind.endswith("-done"):
                counts[base] += times
            if kind == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                visit(body, times * (int(trip.group(1)) if trip else 1))
            for callee in re.findall(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-]+)",
                                     line):
                if kind not in ("all-reduce", "all-reduce-start", "reduce-scatter", "reduce",
                                "reduce-window", "scatter", "sort", "map", "select-and-scatter"):
                    visit(callee, times)

    visit("ENTRY", 1)
    return dict(counts)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return total


def run(args, cfg, devs, data: int, tensor: int) -> dict:
    mesh = sharding.make_mesh(tensor=tensor, data=data, devices=devs)
    policy = get_policy("gpu").replace(kernel=args.kernel)
    with jax.default_device(devs[0]):
        params = jax.eval_shape(lambda: pack_params(
            init_params(cfg, jax.random.PRNGKey(0), policy), cfg))
        params = sharding.abstract_params(params, cfg, mesh)
        state = jax.eval_shape(lambda: engine.init_state(cfg, args.slots, args.context,
                                                         jnp.dtype(policy.kv_cache), 1))
        state_sh = sharding.state_shardings(mesh, state)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             state, state_sh)
        rep = sharding.replicated(mesh)
        n_steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        stop = jax.ShapeDtypeStruct((args.slots,), bool, sharding=rep)
        t0 = time.perf_counter()
        lowered = jax.jit(engine.decode,
                          static_argnames=("cfg", "policy", "chunk", "logprobs", "rows"),
                          donate_argnames=("state",), out_shardings=(state_sh, rep)).trace(
            params, state, n_steps, stop, cfg=cfg, policy=policy, chunk=1,
            logprobs=False, rows=args.slots).lower()
    compiled = aot.compile_lowered(lowered, devs[0])
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    info = aot.target_info(args.target)
    param_bytes = per_device_bytes(params)
    cache_bytes = per_device_bytes(state["cache"])
    # One step reads every linear, the LM head (V x D per device), the norms, and the cache up
    # to the mean position (context/2); the embedding only gathers B rows.
    embed = params["embed_tokens"]
    read = param_bytes - per_device_bytes(embed) + cache_bytes // 2
    coll = step_collectives(hlo)
    n_coll = sum(coll.values())
    step_s = read / info["memory_bandwidth"] + n_coll * COLLECTIVE_US * 1e-6
    mem = compiled.memory_analysis()
    return {
        "bench": "tp_aot", "config": args.config, "target": args.target, "kernel": args.kernel,
        "data": data, "tensor": tensor, "slots": args.slots, "context": args.context,
        "param_bytes_per_device": param_bytes, "kv_cache_bytes_per_device": cache_bytes,
        "bytes_read_per_step_per_device": read, "collectives_per_step": coll,
        "collectives_total": n_coll,
        "projected_step_ms": round(step_s * 1e3, 3),
        "projected_tokens_per_s": round(args.slots / step_s, 1),
        "projected_step_ms_without_collectives": round(
            read / info["memory_bandwidth"] * 1e3, 3),
        "argument_bytes_per_device": getattr(mem, "argument_size_in_bytes", None),
        "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
        "compile_s": round(seconds, 1), "jax": jax.__version__,
        "host": platform.node(), "python": platform.python_version(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/Llama3-8B-1.58-100B-tokens.json")
    parser.add_argument("--target", default="h100", choices=sorted(aot.TARGETS))
    parser.add_argument("--meshes", nargs="+", default=["1x8", "8x1", "2x4"],
                        help="DATAxTENSOR meshes (default: 1x8 8x1 2x4)")
    parser.add_argument("--slots", type=int, default=8, help="decode slots B")
    parser.add_argument("--context", type=int, default=4096, help="KV cache length S")
    parser.add_argument("--kernel", default="auto", choices=("auto", "xla", "pallas"))
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    shapes = [tuple(int(v) for v in m.split("x")) for m in args.meshes]
    devs = devices(args.target, max(d * t for d, t in shapes))
    for data, tensor in shapes:
        print(json.dumps(run(args, cfg, devs[:data * tensor], data, tensor)), flush=True)


if __name__ == "__main__":
    main()
