"""GPU benchmarks for bitnet_jax; benchmarks/gpu_check.sh runs them. One JSON object per line.

Subcommands (python3 -m benchmarks.bench_gpu SUBCOMMAND --help):
  env      backend, devices and package versions
  kernels  ternary matmul timing table: Pallas vs the XLA int8 path vs dense int8 vs bf16 dot,
           on the BitNet-2B4T linear shapes (O x I) at several M, with a parity check
  sweep    Pallas block-config sweep per shape and M (data for tuning `default_config`)
  decode   the real engine (runtime.benchmark) on a random 2B4T-shaped model built on the
           host: decode tokens/s per policy, kernel and batch, peak memory from memory_stats()
  parity   device vs CPU float32 logits of the same random model (a few layers)

Timing method (device time, not host dispatch): one jitted loop applies the op to N weight
copies in turn, N chosen so the copies total about 512 MB, far above the H100's 50 MB (H200:
60 MB) L2, so every call reads its weight from HBM as in a real forward pass. Each op gets the
whole stack and the copy index, as the layer scan hands weights to the kernels: Pallas reads
copy i in place, the XLA paths slice it. Each iteration adds the [M, O] result into the carry
so nothing can be dead-code eliminated; that add is in every method's number. Time per call =
median wall time of `reps` loops / N.

Nothing here has run on a GPU yet; `--allow-cpu` runs the same code on CPU (Pallas in
interpret mode, tiny shapes) only to check the script (benchmarks/gpu_check.sh --smoke).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.quant import unpack_ternary
from bitnet_jax.kernels.gpu import pallas as pallas_gpu
from bitnet_jax.kernels.xla import ternary_matmul_xla

REPO = Path(__file__).resolve().parents[1]
# BitNet-2B4T BitLinear shapes (O, I): q/o proj, k/v proj, gate/up proj, down proj.
SHAPES_2B4T = ((2560, 2560), (640, 2560), (6912, 2560), (2560, 6912))
MS = (1, 8, 32, 64, 512)
_COPY_BYTES = 512 * 2**20


def emit(record: dict) -> None:
    """Print one JSON line (flushed: the device tool returns only the output's tail)."""
    print(json.dumps(record, sort_keys=True), flush=True)


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def _check_backend(allow_cpu: bool) -> bool:
    """True when Pallas must run in interpret mode (CPU smoke runs)."""
    if _on_gpu():
        return False
    if not allow_cpu:
        emit({"bench": "error", "error": f"backend is {jax.default_backend()}, not a GPU; "
              "pass --allow-cpu for a CPU smoke run"})
        sys.exit(2)
    return True


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in s.split("x")) for s in text.split(",") if s)


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


# ------------------------------------------------------------------------------------------------
# Timing


def time_per_call(op, x, ws, reps: int) -> float:
    """Seconds per `op(x, ws, i)` call, i cycling through the stacked copies `ws` [N, ...].

    Each op takes the whole stack and an index, as the layer scan hands weights to the kernels
    (kernels/stacked.py): the Pallas kernel reads copy i in place, the XLA paths slice it.
    """
    out0 = jax.eval_shape(op, x, ws, jnp.int32(0))

    @jax.jit
    def run(x, ws):
        def body(i, acc):
            return acc + op(x, ws, i).astype(acc.dtype)

        return jax.lax.fori_loop(0, ws.shape[0], body, jnp.zeros(out0.shape, out0.dtype))

    run(x, ws).block_until_ready()  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(x, ws).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / ws.shape[0]


def _copies(bytes_per_copy: int, cap: int) -> int:
    return int(min(cap, max(4, math.ceil(_COPY_BYTES / max(1, bytes_per_copy)))))


def _random_x(key, m: int, i: int) -> jax.Array:
    return jax.random.randint(key, (m, i), -128, 128, jnp.int32).astype(jnp.int8)


def _random_packed(key, n: int, r: int, i: int) -> jax.Array:
    """[N, R, I] uint8 with valid codes only (0..2 per plane; skewed to 0, which timing ignores)."""
    bits = jax.random.bits(key, (n, r, i), jnp.uint8)  # one byte per packed byte: ~512 MB max
    out = jnp.zeros_like(bits)
    for plane in range(4):
        c = (bits >> jnp.uint8(2 * plane)) & jnp.uint8(3)
        out = out | ((c % jnp.uint8(3)) << jnp.uint8(2 * plane))
    return out


# ------------------------------------------------------------------------------------------------
# kernels: the timing table


def _methods(interpret: bool, config=None):
    """name -> (weight kind, op(x, stack, i)). Weight kinds (per copy): packed uint8 [R, I],
    int8 [O, I], bf16 [O, I]."""
    nt = (((1,), (1,)), ((), ()))

    def pallas(x, ws, i):  # reads copy i of the stack in place
        return pallas_gpu.ternary_matmul_pallas(x, ws, i, interpret=interpret, config=config)

    def xla_int8(x, ws, i):
        return ternary_matmul_xla(x, jax.lax.dynamic_index_in_dim(ws, i, 0, keepdims=False))

    def int8_dense(x, ws, i):
        t = jax.lax.dynamic_index_in_dim(ws, i, 0, keepdims=False)
        return jax.lax.dot_general(x, t, nt, preferred_element_type=jnp.int32)

    def bf16_dot(x, ws, i):
        wb = jax.lax.dynamic_index_in_dim(ws, i, 0, keepdims=False)
        return jax.lax.dot_general(x.astype(jnp.bfloat16), wb, nt,
                                   preferred_element_type=jnp.float32)

    return {
        "pallas": ("packed", pallas),
        "xla_int8": ("packed", xla_int8),  # in-graph unpack + int8 dot (the reference)
        "xla_int8_dense": ("int8", int8_dense),  # weights pre-unpacked to int8: no unpack cost
        "bf16_dot": ("bf16", bf16_dot),  # a dense bf16 model's linear layer
    }


def _weights(kind: str, packed: jax.Array) -> jax.Array:
    if kind == "packed":
        return packed
    t = jax.vmap(unpack_ternary)(packed)
    return t if kind == "int8" else t.astype(jnp.bfloat16)


def cmd_kernels(args) -> None:
    interpret = _check_backend(args.allow_cpu)
    key = jax.random.PRNGKey(0)
    methods = _methods(interpret)
    chosen = args.methods.split(",") if args.methods else list(methods)
    for o, i in _parse_shapes(args.shapes):
        r = o // 4
        n = _copies(r * i, args.max_copies)
        packed = _random_packed(jax.random.fold_in(key, o * 7 + i), n, r, i)
        for m in _parse_ints(args.ms):
            x = _random_x(jax.random.fold_in(key, m), m, i)
            cfg = pallas_gpu.default_config(m, r, i)
            ref = ternary_matmul_xla(x, packed[0])
            for name in chosen:
                kind, op = methods[name]
                rec = {"bench": "kernel", "method": name, "o": o, "i": i, "m": m}
                try:
                    ws = _weights(kind, packed[: _copies(ws_bytes(kind, o, i), n)])
                    if name == "pallas":
                        rec["config"] = _cfg_dict(cfg)
                        rec["variant"] = pallas_gpu.select_variant(m)
                        rec["exact"] = bool(jnp.array_equal(op(x, ws, jnp.int32(0)), ref))
                    sec = time_per_call(op, x, ws, args.reps)
                except Exception as e:  # report it; one failure must not stop the table
                    rec.update(error=f"{type(e).__name__}: {str(e)[:400]}")
                    emit(rec)
                    continue
                moved = ws_bytes(kind, o, i) + m * i + 4 * m * o
                rec.update(us=round(sec * 1e6, 2), copies=int(ws.shape[0]),
                           gbps=round(moved / sec / 1e9, 2),
                           tops=round(2 * m * o * i / sec / 1e12, 3))
                emit(rec)
                del ws


def ws_bytes(kind: str, o: int, i: int) -> int:
    """Weight bytes one call reads for each weight kind."""
    return {"packed": o * i // 4, "int8": o * i, "bf16": 2 * o * i}[kind]


def _cfg_dict(cfg: pallas_gpu.BlockConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("bm", "bn", "bk", "splits", "num_warps", "num_stages",
                                         "dot")}


# ------------------------------------------------------------------------------------------------
# sweep: Pallas block configs


def candidate_configs(m: int, r: int, i: int) -> list[pallas_gpu.BlockConfig]:
    """A small grid around the defaults; only blocks that divide the real dims (no padding)."""
    base = pallas_gpu.default_config(m, r, i)
    out = [base]
    variant = pallas_gpu.select_variant(m)
    if variant == "gemv":
        bm = base.bm
        for bn in (16, 32, 64):
            for bk in (128, 256, 512):
                if r % bn or i % bk:
                    continue
                steps = i // bk
                for splits in sorted({1, 2, 4, 8, base.splits}):
                    if steps % splits:
                        continue
                    for warps in (4, 8):
                        out.append(pallas_gpu.BlockConfig(bm, bn, bk, splits, warps, 3))
        if m <= 8:
            for bk in (64, 128):
                for splits in (1, 4):
                    if i % (bk * splits) == 0:
                        out.append(pallas_gpu.BlockConfig(m, 16, bk, splits, 4, 3, "reduce"))
        out.append(pallas_gpu.BlockConfig(bm, base.bn, base.bk, base.splits, 4, 3, "bfloat16"))
    else:
        for bm in (64, 128):
            for bn in (16, 32, 64):
                for bk in (64, 128):
                    if r % bn or i % bk:
                        continue
                    for warps, stages in ((4, 3), (8, 3), (8, 4)):
                        out.append(pallas_gpu.BlockConfig(bm, bn, bk, 1, warps, stages))
        out.append(pallas_gpu.BlockConfig(base.bm, base.bn, base.bk, 1, base.num_warps,
                                          base.num_stages, "bfloat16"))
    seen, unique = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique


def cmd_sweep(args) -> None:
    interpret = _check_backend(args.allow_cpu)
    key = jax.random.PRNGKey(1)
    deadline = time.perf_counter() + args.budget_s
    for o, i in _parse_shapes(args.shapes):
        r = o // 4
        n = _copies(r * i, args.max_copies)
        packed = _random_packed(jax.random.fold_in(key, o + i), n, r, i)
        for m in _parse_ints(args.ms):
            x = _random_x(jax.random.fold_in(key, m), m, i)
            ref = ternary_matmul_xla(x, packed[0])
            best = None
            for cfg in candidate_configs(m, r, i):
                if time.perf_counter() > deadline:
                    emit({"bench": "sweep_stopped", "reason": "budget", "budget_s": args.budget_s})
                    return
                rec = {"bench": "sweep", "o": o, "i": i, "m": m, "config": _cfg_dict(cfg)}

                def op(x, ws, i, cfg=cfg):
                    return pallas_gpu.ternary_matmul_pallas(x, ws, i, interpret=interpret,
                                                            config=cfg)

                try:
                    rec["exact"] = bool(jnp.array_equal(op(x, packed, jnp.int32(0)), ref))
                    sec = time_per_call(op, x, packed, args.reps)
                except Exception as e:
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    emit(rec)
                    continue
                rec["us"] = round(sec * 1e6, 2)
                emit(rec)
                if rec["exact"] and (best is None or sec < best[0]):
                    best = (sec, cfg)
            if best is not None:
                emit({"bench": "sweep_best", "o": o, "i": i, "m": m,
                      "us": round(best[0] * 1e6, 2), "config": _cfg_dict(best[1]),
                      "is_default": best[1] == pallas_gpu.default_config(m, r, i)})


# ------------------------------------------------------------------------------------------------
# env


def cmd_env(args) -> None:
    del args
    import jaxlib

    rec = {"bench": "env", "python": platform.python_version(), "jax": jax.__version__,
           "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
           "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind,
           "pallas_triton": pallas_gpu._pl_triton is not None}
    for pkg in ("numpy", "flax", "optax", "safetensors", "gguf", "tokenizers", "sentencepiece",
                "tiktoken", "jinja2", "tqdm"):
        try:
            mod = __import__(pkg)
            rec[pkg] = getattr(mod, "__version__", "present")
        except Exception as e:  # report what is missing on the device image
            rec[pkg] = f"missing ({type(e).__name__})"
    emit(rec)


# ------------------------------------------------------------------------------------------------
# Model level: a random 2B4T-shaped model built on the host, run by the real engine


def _policy(name: str, kernel: str):
    from bitnet_jax.model.policy import Policy

    dtype = {"bf16": "bfloat16", "f32": "float32"}[name]
    return Policy(param_dtype=dtype, compute_dtype=dtype, output_dtype="float32", kernel=kernel)


# The 81 bytes whose four 2-bit planes all hold a valid code 0..2 (quant.py layout).
_VALID_BYTES = np.array([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3)
                         for c in range(3) for d in range(3)], np.uint8)


def random_model(config_path: str, layers: int = 0, seed: int = 0):
    """A Model with random packed ternary weights, built with NumPy on the host (seconds for
    2B4T; no jax work until the engine places it). Weight scales 1/sqrt(2I/3) keep activations
    O(1) through the layers, so bf16 logits stay finite and decoding runs every step."""
    from bitnet_jax.formats.base import Model
    from bitnet_jax.model.config import load_config
    from bitnet_jax.runtime.memory import param_specs

    cfg = load_config(config_path)
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers)
    rng = np.random.default_rng(seed)
    specs = param_specs(cfg, _policy("f32", "auto"))

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        if spec.dtype == jnp.uint8:
            return _VALID_BYTES[rng.integers(0, 81, spec.shape, dtype=np.uint8)]
        if name.endswith("['scale']"):
            i = specs_i[name.rsplit("['scale']", 1)[0]]
            return np.full(spec.shape, 1.0 / math.sqrt(2 * i / 3), np.float32)
        if "norm" in name:
            return np.ones(spec.shape, np.float32)
        return rng.standard_normal(spec.shape, dtype=np.float32)

    flat = jax.tree_util.tree_flatten_with_path(specs)[0]
    specs_i = {jax.tree_util.keystr(p).rsplit("['packed']", 1)[0]: s.shape[-1]
               for p, s in flat if jax.tree_util.keystr(p).endswith("['packed']")}
    params = jax.tree_util.tree_map_with_path(leaf, specs)
    return Model(cfg, params, tokenizer=None)


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def cmd_decode(args) -> None:
    """Decode tokens/s of the real engine (runtime.benchmark: generate with greedy sampling,
    after a warm-up run) on a random 2B4T-shaped model, per policy, kernel and batch."""
    _check_backend(args.allow_cpu)
    from bitnet_jax.runtime.benchmark import benchmark

    backend = "gpu" if _on_gpu() else "cpu"
    model = random_model(args.config, args.layers)
    for pol_name in args.policies.split(","):
        for kernel in args.kernels.split(","):
            for batch in _parse_ints(args.batch):
                rec = {"bench": "decode", "policy": pol_name, "kernel": kernel, "batch": batch,
                       "prompt": args.prompt_len, "new": args.new_tokens,
                       "layers": model.config.num_hidden_layers,
                       "config": Path(args.config).name}
                try:
                    out = benchmark(model, prompt_tokens=args.prompt_len,
                                    gen_tokens=args.new_tokens, batch=batch, backend=backend,
                                    policy=_policy(pol_name, kernel))
                except Exception as e:  # report it; one failure must not stop the table
                    rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                    emit(rec)
                    continue
                peak, limit = _peak_bytes()
                rec.update({k: (round(v, 3) if isinstance(v, float) else v)
                            for k, v in out.items()}, peak_bytes_in_use=peak, bytes_limit=limit)
                emit(rec)


def cmd_parity(args) -> None:
    """Logits of one random model on the device (each kernel/policy) vs float32 XLA on the CPU."""
    _check_backend(args.allow_cpu)
    from bitnet_jax import forward

    cpu = jax.devices("cpu")[0]
    ref_policy = _policy("f32", "xla")
    model = random_model(args.config, args.layers, seed=3)
    cfg, params = model.config, model.params
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (args.batch, args.tokens))
    tokens = tokens.astype(np.int32)
    with jax.default_device(cpu):
        ref = np.asarray(jax.jit(lambda p, t: forward(p, t, cfg, ref_policy))(
            jax.device_put(params, cpu), jax.device_put(tokens, cpu)))
    dev = jax.devices()[0]
    for pol_name in args.policies.split(","):
        for kernel in args.kernels.split(","):
            policy = _policy(pol_name, kernel)
            rec = {"bench": "parity", "policy": pol_name, "kernel": kernel,
                   "matmul_precision": args.matmul_precision,
                   "layers": cfg.num_hidden_layers, "tokens": args.tokens, "batch": args.batch}
            try:
                p = jax.device_put(_cast_float_params(params, policy.param), dev)
                # f32 dots on Hopper default to TF32; "highest" isolates kernel differences.
                with jax.default_matmul_precision(args.matmul_precision):
                    got = np.asarray(jax.jit(lambda p, t: forward(p, t, cfg, policy))(
                        p, jax.device_put(tokens, dev)))
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                emit(rec)
                continue
            diff = got - ref
            rec.update(max_abs=float(np.max(np.abs(diff))),
                       rel_l2=float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30)),
                       argmax_agree=float(np.mean(got.argmax(-1) == ref.argmax(-1))),
                       finite=bool(np.isfinite(got).all()))
            emit(rec)


def _cast_float_params(params, dtype):
    """Cast float leaves (embeddings, norms) to `dtype`; packed leaves, scales included, stay."""
    from bitnet_jax.quant import is_packed

    def cast(a):
        if is_packed(a):
            return a
        a = np.asarray(a)
        return a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a

    return jax.tree.map(cast, params, is_leaf=is_packed)


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.bench_gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--allow-cpu", action="store_true",
                       help="run on CPU (interpret mode) to smoke-test the script")
        return p

    common(sub.add_parser("env"))
    for name in ("kernels", "sweep"):
        p = common(sub.add_parser(name))
        p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES_2B4T),
                       help="comma list of OxI")
        p.add_argument("--ms", default=",".join(map(str, MS)), help="comma list of M")
        p.add_argument("--reps", type=int, default=5)
        p.add_argument("--max-copies", type=int, default=1024,
                       help="cap on rotated weight copies (512 MB target)")
        if name == "kernels":
            p.add_argument("--methods", default="",
                           help="comma list of pallas,xla_int8,xla_int8_dense,bf16_dot")
        else:
            p.add_argument("--budget-s", type=float, default=120.0)
    p = common(sub.add_parser("decode"))
    p.add_argument("--config", default=str(REPO / "configs" / "bitnet-b1.58-2B-4T.json"))
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: keep)")
    p.add_argument("--batch", default="1,8,32,64")
    p.add_argument("--policies", default="bf16,f32")
    p.add_argument("--kernels", default="pallas,xla")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p = common(sub.add_parser("parity"))
    p.add_argument("--config", default=str(REPO / "configs" / "bitnet-b1.58-2B-4T.json"))
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--matmul-precision", default="highest",
                   help="jax.default_matmul_precision for the GPU forward (default, high, highest)")
    p.add_argument("--policies", default="f32,bf16")
    p.add_argument("--kernels", default="pallas,xla")
    args = ap.parse_args(argv)
    {"env": cmd_env, "kernels": cmd_kernels, "sweep": cmd_sweep, "decode": cmd_decode,
     "parity": cmd_parity}[args.cmd](args)


if __name__ == "__main__":
    main()
