"""Ternary matmul timings on CPU: packed FFI kernel vs the XLA paths vs a float32 dot.

One JSON line per (shape, M, path, ISA) on stdout:

  {"shape": [I, O], "m": M, "path": ..., "ms": median, "ms_min": ..., "weight_bytes": ...,
   "gbps": weight bytes / median time, "gmacs": M*I*O / median time, "cpu": ..., "cpus": ...,
   "jax": ..., "isa": ...}

Paths (all give [M, O] int32, or f32 for "f32"):
  ffi        packed 2-bit FFI kernel (kernels/cpu/ffi.py), reads O*I/4 bytes: the GEMV at M = 1,
             the GEMM (AVX-512 VNNI) at M >= 2, the 4-token AVX2 block at M >= 4
  head       int8 x int8 LM-head kernel (int8_matmul_ffi) on an [O, I] int8 weight
  xla        ternary_matmul_xla: in-graph unpack of the packed weight + int8 dot (the reference)
  xla_int8   int8 dot on a pre-unpacked [O, I] int8 weight (no unpack; 4x the bytes of ffi)
  f32        float32 x @ W.T on a dense [O, I] float32 weight

Shapes are the BitNet-2B-4T (2560 <-> 6912) and bitnet_b1_58-large (1536 <-> 4096) projections.
With --cold every call reads a different copy of the weight (enough copies to exceed the L3
cache) so the numbers reflect DRAM bandwidth, as in a real decode over many layers. With several
--isa values the kernel paths alternate call by call on the same operands (set_isa), so a noisy
machine slows them alike.

  python benchmarks/bench_bitlinear.py --quick
  python benchmarks/bench_bitlinear.py --shapes 2560x6912 --m 1 2 --paths ffi xla --cold
  python benchmarks/bench_bitlinear.py --paths ffi --isa avx2 avx512vnni --m 1 2 4 8 16 --cold
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.quant import unpack_ternary
from bitnet_jax.kernels.cpu import ffi as cpu_ffi
from bitnet_jax.kernels.xla import ternary_matmul_xla

SHAPES = ["2560x6912", "6912x2560", "1536x4096", "4096x1536"]
MS = [1, 2, 8, 32, 128]
PATHS = ["ffi", "xla", "xla_int8", "f32"]
ALL_PATHS = PATHS + ["head"]
COLD_BYTES = 96 << 20  # comfortably above the L3 of the CPUs this is run on


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _int8_dot(x_q, t):
    # The layout jax-notes §2.3 measured fastest: weight [O, I], contract the last axes,
    # and at least two rows (M=1 hits XLA's s32-convert path).
    m = x_q.shape[0]
    if m == 1:
        x_q = jnp.concatenate([x_q, jnp.zeros_like(x_q)], axis=0)
    acc = jax.lax.dot_general(x_q, t, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return acc[:m]


def _f32_dot(x, w):
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _weights(path: str, packed: jax.Array) -> tuple[jax.Array, int]:
    """The weight operand a path reads, and its size in bytes."""
    if path in ("ffi", "xla"):
        w = packed
    elif path == "head":
        w = jnp.clip(unpack_ternary(packed).astype(jnp.int32) * 127 // 2, -127, 127)
        w = jnp.concatenate([w] * 4, axis=0)[: packed.shape[0] * 4].astype(jnp.int8)
    elif path == "xla_int8":
        w = unpack_ternary(packed)
    else:
        w = unpack_ternary(packed).astype(jnp.float32)
    w = jax.block_until_ready(w)
    return w, w.size * w.dtype.itemsize


def _fn(path: str):
    return {
        "ffi": cpu_ffi.ternary_matmul_kernel,
        "head": cpu_ffi.int8_matmul_ffi,
        "xla": ternary_matmul_xla,
        "xla_int8": _int8_dot,
        "f32": _f32_dot,
    }[path]


def time_case(path, i, o, m, reps, cold, rng, isas=(None,)):
    """Median/min times of `path` at [M, I] x [O, I]; with several ISAs, one dict per ISA, the
    ISAs alternating call by call."""
    packed = jnp.asarray(rng.integers(0, 256, (o // 4, i), dtype=np.uint8))
    w, nbytes = _weights(path, packed)
    copies = [w]
    if cold:
        n = max(1, -(-COLD_BYTES // nbytes))
        copies = [w] + [jax.block_until_ready(w + 0) for _ in range(n - 1)]
    x = jnp.asarray(rng.integers(-127, 128, (m, i), dtype=np.int8))
    if path == "f32":
        x = x.astype(jnp.float32)
    fn = jax.jit(_fn(path))
    times = {isa: [] for isa in isas}
    for isa in isas:
        if isa:
            cpu_ffi.set_isa(isa)
        for c in copies[:2]:
            fn(x, c).block_until_ready()  # compile and warm up
    for k in range(reps):
        c = copies[k % len(copies)]
        for isa in isas:
            if isa:
                cpu_ffi.set_isa(isa)
            t0 = time.perf_counter()
            fn(x, c).block_until_ready()
            times[isa].append(time.perf_counter() - t0)
    out = {}
    for isa, ts in times.items():
        med = statistics.median(ts)
        out[isa] = {"ms": med * 1e3, "ms_min": min(ts) * 1e3, "weight_bytes": nbytes,
                    "gbps": nbytes / med / 1e9, "gmacs": m * i * o / med / 1e9}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="IxO, e.g. 2560x6912")
    ap.add_argument("--m", nargs="+", type=int, default=MS, help="token counts M")
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=ALL_PATHS)
    ap.add_argument("--reps", type=int, default=30, help="timed calls per case")
    ap.add_argument("--cold", action="store_true", help="rotate weight copies beyond L3")
    ap.add_argument("--isa", nargs="+", default=None,
                    help="FFI kernel path(s) for ffi/head (see cpu_ffi.ISAS), interleaved")
    ap.add_argument("--quick", action="store_true", help="few reps, M in (1, 8, 32)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.m = 7, [1, 8, 32]

    paths = list(args.paths)
    if not cpu_ffi.available():
        paths = [p for p in paths if p not in ("ffi", "head")]
    meta = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cold": args.cold,
        "load_avg": os.getloadavg(),
    }
    rng = np.random.default_rng(0)
    for shape in args.shapes:
        i, o = (int(v) for v in shape.lower().split("x"))
        for m in args.m:
            for path in paths:
                kernel = path in ("ffi", "head")
                isas = tuple(args.isa) if (kernel and args.isa) else (None,)
                res = time_case(path, i, o, m, args.reps, args.cold, rng, isas)
                for isa, r in res.items():
                    line = {"shape": [i, o], "m": m, "path": path,
                            **{k: round(v, 4) if isinstance(v, float) else v
                               for k, v in r.items()},
                            **meta, "isa": (isa or cpu_ffi.isa()) if kernel else None}
                    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
