"""Account for every byte and kernel of a decode step, compiled for an H100 without a GPU.

    python benchmarks/gpu_aot.py --json                # 2B4T and large, batch 1/8/64, context 1024

For each (shape, batch, policy) the engine's decode program (runtime/engine.py `aot_lower`,
random-shaped abstract params: nothing runs) is compiled for the compile-only H100 of
bitnet_jax/kernels/gpu/aot.py, and its optimized HLO is read by kernels/gpu/hlo.py. One JSON
line each, with:

  bytes_per_step       HBM bytes of one iteration of the decode loop: every launch's operand and
                       result bytes (slices and in-place updates counted by what they move; the
                       Pallas calls by the bytes they declare: one layer of the stacked weights,
                       the visible cache), loops multiplied by their trip counts
  ideal_bytes          packed ternary weights (L·O·I/4 per BitLinear) + the LM head as stored +
                       the KV cache read (2·L·B·K·S·H at S = context, every position live)
  bytes_ratio          bytes_per_step / ideal_bytes
  kernels_per_step     launches per decode step: fusions, custom calls (Pallas, cuBLAS), copies,
                       ... of the loop body and condition, layer loops times their trip count;
                       conditionals counted by their cheapest branch (what greedy sampling runs;
                       kernels_per_step_max takes the dearest)
  call_*_outside_step  what one call of the program does outside its decode loop (set-up, output
                       buffers, layout changes of the state): once per up to DECODE_CHUNK steps
  peak_bytes           memory_analysis(): arguments + outputs - aliased (donated state) + temps
  projected_tokens_per_s  batch / (bytes_per_step / bandwidth + kernels_per_step · 3 µs)

Needs jax >= 0.11 with the CUDA 13 plugin (the .venv312 of .ci/gpu_aot.sh). Compiling a
30-layer decode program takes a few seconds to a minute per configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"2b4t": "bitnet-b1.58-2B-4T", "large": "bitnet_b1_58-large"}
POLICIES = {  # name -> (compute dtype, lm_head)
    "bf16": ("bfloat16", "float"), "f32": ("float32", "float"), "bf16-int8head": ("bfloat16", "int8"),
}
LAUNCH_S = 3e-6


def ideal_bytes(cfg, policy, lm_head: str, batch: int, context: int) -> int:
    """Packed ternary weights + the LM head as stored + the KV cache read at S = context."""
    # Deferred: imported after sys.path is set up in main().
    from bitnet_jax.model.params import linear_shapes
    from bitnet_jax.runtime import memory

    ternary = cfg.num_hidden_layers * sum(o * i // 4 for o, i in linear_shapes(cfg).values())
    v, d = cfg.vocab_size, cfg.hidden_size
    head = v * d + 4 * v if lm_head == "int8" else v * d * jax.numpy.dtype(policy.param).itemsize
    return ternary + head + memory.kv_cache_bytes(cfg, policy, batch, context)


def measure(shape: str, batch: int, policy_name: str, *, context: int, target: str,
            kernel: str) -> dict:
    # Deferred: imported after sys.path is set up in main().
    from bitnet_jax.kernels.gpu import aot, hlo
    from bitnet_jax.model.config import load_config
    from bitnet_jax.model.policy import Policy
    from bitnet_jax.runtime import engine, memory

    cfg = load_config(REPO / "configs" / f"{SHAPES[shape]}.json")
    compute, lm_head = POLICIES[policy_name]
    policy = Policy(param_dtype=compute, compute_dtype=compute, output_dtype="float32",
                    kernel=kernel, lm_head=lm_head)
    dev = aot.device(target)
    params = aot.abstract(memory.param_specs(cfg, policy, lm_head=lm_head), dev)
    t0 = time.perf_counter()
    with aot.on(dev):
        lowered = engine.aot_lower(params, cfg, policy, slots=batch, context=context, device=dev)
    compiled = aot.compile_lowered(lowered["decode"], dev)
    compile_s = time.perf_counter() - t0
    program = hlo.Program(compiled.as_text())
    costs = program.analyze()
    if costs["step"] is None:
        raise RuntimeError("the decode program has no decode loop to take a step of")
    low, high = costs["step"]
    run_low = costs["run"][0]
    stats = compiled.memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    ideal = ideal_bytes(cfg, policy, lm_head, batch, context)
    bandwidth = aot.target_info(target)["memory_bandwidth"]
    step_s = low.bytes / bandwidth + low.kernels * LAUNCH_S
    triton = sum(k.count for k in program.kernels if k.target == "__gpu$xla.gpu.triton")
    return {
        "bench": "gpu_aot", "shape": shape, "batch": batch, "context": context,
        "policy": policy_name, "kernel": kernel, "target": target,
        "bytes_per_step": low.bytes, "ideal_bytes": ideal,
        "bytes_ratio": round(low.bytes / ideal, 3),
        "kernels_per_step": low.kernels, "kernels_per_step_max": high.kernels,
        "bytes_per_step_max": high.bytes, "pallas_calls_per_run": triton,
        "call_bytes_outside_step": run_low.bytes - low.bytes,
        "call_kernels_outside_step": run_low.kernels - low.kernels,
        "peak_bytes": peak, "temp_bytes": stats.temp_size_in_bytes,
        "projected_tokens_per_s": round(batch / step_s, 1),
        "projected_ms_per_step": round(step_s * 1e3, 4),
        "compile_s": round(compile_s, 1),
    }


def machine() -> dict:
    return {"bench": "machine", "python": platform.python_version(), "jax": jax.__version__,
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "note": "compile-only target: no GPU was used; bytes and kernels read from the HLO"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON line per configuration")
    ap.add_argument("--shapes", default="2b4t,large")
    ap.add_argument("--batch", default="1,8,64")
    ap.add_argument("--policies", default="bf16,f32,bf16-int8head")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--target", default="h100", choices=["h100", "h200"])
    ap.add_argument("--kernel", default="auto", choices=["auto", "pallas", "xla"])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    emit = (lambda r: print(json.dumps(r), flush=True)) if args.json else _table
    emit(machine())
    for shape in args.shapes.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            for pol in args.policies.split(","):
                try:
                    emit(measure(shape, batch, pol, context=args.context, target=args.target,
                                 kernel=args.kernel))
                except Exception as e:  # report and go on: one failure must not stop the table
                    emit({"bench": "gpu_aot", "shape": shape, "batch": batch, "policy": pol,
                          "error": f"{type(e).__name__}: {str(e)[:300]}"})


def _table(rec: dict) -> None:
    if rec.get("bench") != "gpu_aot" or "error" in rec:
        print(rec, flush=True)
        return
    print(f"{rec['shape']:>6} B={rec['batch']:<3} {rec['policy']:<14} "
          f"bytes {rec['bytes_per_step'] / 1e9:7.3f} GB  ideal {rec['ideal_bytes'] / 1e9:7.3f} GB "
          f"ratio {rec['bytes_ratio']:5.2f}  kernels {rec['kernels_per_step']:5d}  "
          f"peak {rec['peak_bytes'] / 1e9:6.2f} GB  {rec['projected_tokens_per_s']:9.1f} tok/s",
          flush=True)


if __name__ == "__main__":
    main()
