"""bitnet_jax vs llama.cpp on the same GGUF file, interleaved in one run, on this CPU.

For each shape (large = bitnet_b1_58-large, 2b4t = BitNet-2B4T) a random-ternary TQ2_0 GGUF is
written by benchmarks/make_random_gguf.py. Then, for 1 and 2 threads (a process pinned with
taskset to that many cores: XLA's own thread flags are not reliable, jax-notes §5), it alternates

  llama.cpp   llama-bench -m FILE -t N -p P -n G -r REPS -o json
  bitnet_jax  bitnet-jax bench --model FILE --prompt-tokens P --gen-tokens G --batch B --json

and reports tokens/s, the ratio to llama.cpp, peak RSS, and the memory-bandwidth roofline:
bytes read per decoded token (packed linear weights + LM head + KV cache) divided by the read
bandwidth measured here with the same thread count.

  python benchmarks/bench_cpu.py --shapes large --threads 1 2 --batch 1 8 > results.jsonl

llama-bench comes from benchmarks/build_llamacpp.sh (llama.cpp vendored in the llama-cpp-python
sdist, -DGGML_NATIVE=ON). Prints one JSON line per measurement, then a summary line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("BITNET_JAX_BENCH_DIR", Path.home() / ".cache" / "bitnet_jax" / "bench"))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores(n: int) -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:n])


def read_bandwidth(threads: int, mb: int = 1024, reps: int = 5) -> float:
    """GB/s of a streaming read over `mb` MB split across `threads` threads.

    An int32 max is SIMD-vectorised and releases the GIL, so it is bound by memory, not by
    arithmetic (an int64 sum is not: it measured 25% lower here).
    """
    data = np.ones(mb * 1024 * 1024 // 4, np.int32)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(reps):
        ts = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def bytes_per_token(path: Path, lm_head_bytes_per_weight: float, ctx: int,
                    kv_bytes_per_value: int = 2) -> dict:
    """Bytes one decode step reads: packed linears, LM head, KV cache at context `ctx`
    (float16 in llama.cpp and in bitnet-jax's CLI on CPU)."""
    from bitnet_jax.formats.gguf.reader import read_gguf

    g = read_gguf(path)
    lin = emb = 0
    for t in g.tensors.values():
        if ".attn_" in t.name or ".ffn_" in t.name:
            if "norm" not in t.name:
                lin += t.nbytes
        elif t.name == "token_embd.weight":
            emb = int(np.prod(t.shape))
    arch = g.metadata["general.architecture"]
    d = g.metadata[f"{arch}.embedding_length"]
    layers = g.metadata[f"{arch}.block_count"]
    kv = g.metadata.get(f"{arch}.attention.head_count_kv", g.metadata[f"{arch}.attention.head_count"])
    heads = g.metadata[f"{arch}.attention.head_count"]
    kv_bytes = 2 * layers * ctx * kv * (d // heads) * kv_bytes_per_value  # K and V
    return {"linear": lin, "lm_head": int(emb * lm_head_bytes_per_weight), "kv": kv_bytes}


def run_llama_bench(exe: str, path: Path, threads: int, p: int, g: int, reps: int) -> dict:
    cmd = ["taskset", "-c", cores(threads), exe, "-m", str(path), "-t", str(threads), "-p", str(p),
           "-n", str(g), "-r", str(reps), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    res = {}
    for r in rows:
        key = "prefill_tokens_per_s" if r.get("n_prompt", 0) else "decode_tokens_per_s"
        res[key] = r["avg_ts"]
    res["build"] = rows[0].get("build_commit", "")
    return res


def run_ours(path: Path, threads: int, p: int, g: int, batch: int) -> dict:
    cmd = ["taskset", "-c", cores(threads), sys.executable, "-m", "bitnet_jax", "bench",
           "--model", str(path), "--prompt-tokens", str(p), "--gen-tokens", str(g),
           "--batch", str(batch), "--backend", "cpu", "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["large"], choices=("large", "2b4t"))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    ap.add_argument("--llama-bench", default=None, help="path to llama-bench (default: build it)")
    ap.add_argument("--skip-peer", action="store_true", help="measure bitnet_jax only")
    args = ap.parse_args(argv)

    exe = args.llama_bench
    if exe is None and not args.skip_peer:
        exe = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_llamacpp.sh")],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    import jax

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__,
               "python": platform.python_version()}
    print(json.dumps({"machine": machine}), flush=True)
    bw = {t: read_bandwidth(t) for t in args.threads}
    print(json.dumps({"read_bandwidth_gb_s": bw}), flush=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        # llama.cpp's `bitnet` graph for every shape: upstream llama.cpp loads no other BitNet
        # architecture name (the 2b4t shape then has a SiLU FFN; sizes are 2B4T's).
        path = CACHE / f"random-{shape}-bitnet-tq2_0.gguf"
        if not path.exists():
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_random_gguf.py"),
                            str(path), "--shape", shape, "--type", "tq2_0", "--arch", "bitnet"],
                           check=True)
        size_mb = path.stat().st_size / 1e6
        for threads in args.threads:
            for batch in args.batch:
                peer, ours = [], []
                for _ in range(args.rounds):
                    if not args.skip_peer and batch == 1:
                        peer.append(run_llama_bench(exe, path, threads, args.prompt_tokens,
                                                    args.gen_tokens, args.reps))
                        print(json.dumps({"engine": "llama.cpp", "shape": shape,
                                          "threads": threads, **peer[-1]}), flush=True)
                    ours.append(run_ours(path, threads, args.prompt_tokens, args.gen_tokens, batch))
                    print(json.dumps({"engine": "bitnet_jax", "shape": shape, "threads": threads,
                                      "batch": batch, **ours[-1]}), flush=True)
                best = {k: max(r[k] for r in ours)
                        for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
                ctx = args.prompt_tokens + args.gen_tokens // 2  # mean context while decoding
                ours_bytes = bytes_per_token(
                    path, 1.0 if ours[-1].get("lm_head") == "int8" else 2.0, ctx,
                    4 if ours[-1].get("kv_cache", ours[-1].get("policy")) == "float32" else 2)
                peer_bytes = bytes_per_token(path, 2.0, ctx)
                roof_ours = bw[threads] * 1e9 / sum(ours_bytes.values())
                roof_peer = bw[threads] * 1e9 / sum(peer_bytes.values())
                summary = {"summary": True, "shape": shape, "threads": threads, "batch": batch,
                           "file_mb": round(size_mb, 1), **{f"ours_{k}": round(v, 2) for k, v in best.items()},
                           "ours_peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in ours),
                           "ours_bytes_per_token": ours_bytes, "ours_roofline_tokens_per_s": round(roof_ours, 1)}
                if batch == 1:  # at batch B one weight read serves B tokens: no per-token roofline
                    summary["ours_roofline_fraction"] = round(best["decode_tokens_per_s"] / roof_ours, 3)
                if peer:
                    pbest = {k: max(r[k] for r in peer)
                             for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
                    summary.update({f"llamacpp_{k}": round(v, 2) for k, v in pbest.items()})
                    summary["decode_ratio"] = round(best["decode_tokens_per_s"] / pbest["decode_tokens_per_s"], 3)
                    summary["prefill_ratio"] = round(best["prefill_tokens_per_s"] / pbest["prefill_tokens_per_s"], 3)
                    summary["llamacpp_roofline_tokens_per_s"] = round(roof_peer, 1)
                    summary["llamacpp_roofline_fraction"] = round(pbest["decode_tokens_per_s"] / roof_peer, 3)
                print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
