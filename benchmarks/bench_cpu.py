"""bitnet_jax vs llama.cpp on the same GGUF file, interleaved in one run, on this CPU.

For each shape (large = bitnet_b1_58-large, 2b4t = BitNet-2B4T) a random-ternary TQ2_0 GGUF is
written by benchmarks/make_random_gguf.py. Then, for each thread count (a process pinned with
taskset to that many cores: XLA's own thread flags are not reliable, jax-notes §5) and prompt
length, every round runs, one after the other,

  llama.cpp   llama-bench -m FILE -t N -p P -n G -r REPS -o json               (batch 1)
  llama.cpp   llama-batched-bench -m FILE -t N -npp P -ntg G -npl 1,2,4,...     (batch B)
  bitnet_jax  bitnet-jax bench --model FILE --prompt-tokens P --gen-tokens G --batch B --json

and reports tokens/s of all rows together, the ratios to llama.cpp (batch 1 to llama-bench,
batch B to llama-batched-bench's S_TG / S_PP at B parallel sequences with their own prompts),
our batch-B decode over our batch-1 decode, peak RSS over the file size, and at batch 1 the
memory-bandwidth roofline: bytes read per decoded token (packed linear weights + LM head + KV
cache) divided by the read bandwidth measured here with the same thread count.

  python benchmarks/bench_cpu.py --shapes large 2b4t --threads 1 2 --batch 1 2 4 8 16 \
      --prompt-tokens 128 512 > results.jsonl

The llama.cpp tools come from benchmarks/build_llamacpp.sh (llama.cpp vendored in the
llama-cpp-python sdist, -DGGML_NATIVE=ON). Prints one JSON line per measurement, then a
summary line per case. Timings on a shared machine are noisy: compare the interleaved ratios.
`--kv-cache int8` runs our int8 KV cache against llama.cpp's q8_0 cache (`-ctk q8_0 -ctv q8_0
-fa on`: llama.cpp quantises the V cache only with flash attention).
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

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("BITNET_JAX_BENCH_DIR",
                           Path.home() / ".cache" / "bitnet_jax" / "bench"))


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
                    kv_cache: str = "float16") -> dict:
    """Bytes one decode step reads: packed linears, LM head, KV cache at context `ctx`
    (float16 in llama.cpp and in bitnet-jax's CLI on CPU; int8 rows: H + 4 bytes per H)."""
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
    heads = g.metadata[f"{arch}.attention.head_count"]
    kv = g.metadata.get(f"{arch}.attention.head_count_kv", heads)
    row = {"float32": 4 * (d // heads), "int8": d // heads + 4}.get(kv_cache, 2 * (d // heads))
    kv_bytes = 2 * layers * ctx * kv * row  # K and V
    return {"linear": lin, "lm_head": int(emb * lm_head_bytes_per_weight), "kv": kv_bytes}


def llama_cache_flags(kv_cache: str) -> list[str]:
    """llama.cpp's flags for our --kv-cache: int8 rows ~ q8_0 (blocks of 32 with a float16
    scale), whose V cache needs flash attention; otherwise its float16 default."""
    return ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"] if kv_cache == "int8" else []


def run_llama_bench(exe: str, path: Path, threads: int, p: int, g: int, reps: int,
                    kv_cache: str = "auto") -> dict:
    cmd = ["taskset", "-c", cores(threads), exe, "-m", str(path), "-t", str(threads), "-p", str(p),
           "-n", str(g), "-r", str(reps), "-o", "json", *llama_cache_flags(kv_cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out)
    res = {}
    for r in rows:
        key = "prefill_tokens_per_s" if r.get("n_prompt", 0) else "decode_tokens_per_s"
        res[key] = r["avg_ts"]
    res["build"] = rows[0].get("build_commit", "")
    return res


def run_batched_bench(exe: str, path: Path, threads: int, p: int, g: int,
                      batches: list[int], kv_cache: str = "auto") -> dict:
    """llama-batched-bench: B sequences with their own P-token prompts, then G tokens each.

    Returns {B: {"prefill_tokens_per_s": S_PP, "decode_tokens_per_s": S_TG}}, both over all B
    sequences (llama.cpp's pl*npp/t_pp and pl*ntg/t_tg).
    """
    ctx = max(batches) * (p + g) + 64
    cmd = ["taskset", "-c", cores(threads), exe, "-m", str(path), "-t", str(threads),
           "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(p), "-ntg", str(g),
           "-npl", ",".join(str(b) for b in batches), "--output-format", "jsonl",
           *llama_cache_flags(kv_cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            res[int(r["pl"])] = {"prefill_tokens_per_s": r["speed_pp"],
                                 "decode_tokens_per_s": r["speed_tg"]}
    return res


def run_ours(path: Path, threads: int, p: int, g: int, batch: int, kv_cache: str = "auto") -> dict:
    cmd = ["taskset", "-c", cores(threads), sys.executable, "-m", "bitnet_jax", "bench",
           "--model", str(path), "--prompt-tokens", str(p), "--gen-tokens", str(g),
           "--batch", str(batch), "--backend", "cpu", "--json", "--kv-cache", kv_cache]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _best(rows: list[dict], key: str) -> float:
    return max(r[key] for r in rows) if rows else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["large"], choices=("large", "2b4t"))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--prompt-tokens", nargs="+", type=int, default=[128])
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    ap.add_argument("--llama-bench", default=None, help="path to llama-bench (default: build it)")
    ap.add_argument("--skip-peer", action="store_true", help="measure bitnet_jax only")
    ap.add_argument("--kv-cache", default="auto", choices=("auto", "float16", "int8"),
                    help="our --kv-cache (int8: llama.cpp runs -ctk q8_0 -ctv q8_0 -fa on)")
    args = ap.parse_args(argv)

    exe = batched = None
    if not args.skip_peer:
        exe = args.llama_bench
        if exe is None:
            built = subprocess.run(["bash", str(ROOT / "benchmarks" / "build_llamacpp.sh")],
                                   capture_output=True, text=True, check=True).stdout.split()
            exe = next(t for t in built if t.endswith("/llama-bench"))
        batched = str(Path(exe).with_name("llama-batched-bench"))
    import jax

    from bitnet_jax.kernels.cpu import ffi as cpu_ffi

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "jax": jax.__version__,
               "python": platform.python_version(),
               "isa": cpu_ffi.isa() if cpu_ffi.available() else None,
               "load_avg": os.getloadavg()}
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
        size_mb = path.stat().st_size / 2**20  # MiB, the unit of `bench`'s peak_rss_mb
        for threads in args.threads:
            for prompt in args.prompt_tokens:
                peer, peer_b = [], []
                ours = {b: [] for b in args.batch}
                for _ in range(args.rounds):
                    if exe:
                        peer.append(run_llama_bench(exe, path, threads, prompt,
                                                    args.gen_tokens, args.reps, args.kv_cache))
                        print(json.dumps({"engine": "llama.cpp", "tool": "llama-bench",
                                          "shape": shape, "threads": threads,
                                          "prompt_tokens": prompt, **peer[-1]}), flush=True)
                        peer_b.append(run_batched_bench(batched, path, threads, prompt,
                                                        args.gen_tokens, args.batch,
                                                        args.kv_cache))
                        for b, r in sorted(peer_b[-1].items()):
                            print(json.dumps({"engine": "llama.cpp",
                                              "tool": "llama-batched-bench", "shape": shape,
                                              "threads": threads, "prompt_tokens": prompt,
                                              "batch": b, **r}), flush=True)
                    for batch in args.batch:
                        ours[batch].append(run_ours(path, threads, prompt, args.gen_tokens,
                                                    batch, args.kv_cache))
                        print(json.dumps({"engine": "bitnet_jax", "shape": shape,
                                          "threads": threads, **ours[batch][-1]}), flush=True)
                ours1 = _best(ours.get(1, []), "decode_tokens_per_s")
                for batch in args.batch:
                    rows = ours[batch]
                    best = {k: _best(rows, k)
                            for k in ("decode_tokens_per_s", "prefill_tokens_per_s")}
                    rss = max(r.get("peak_rss_mb", 0) for r in rows)
                    summary = {"summary": True, "shape": shape, "threads": threads,
                               "batch": batch, "prompt_tokens": prompt,
                               "gen_tokens": args.gen_tokens, "file_mb": round(size_mb, 1),
                               "kv_cache": rows[-1].get("kv_cache"),
                               **{f"ours_{k}": round(v, 2) for k, v in best.items()},
                               "ours_peak_rss_mb": round(rss, 1),
                               "ours_rss_over_file": round(rss / size_mb, 3)}
                    if ours1 and batch != 1:
                        summary["ours_decode_over_batch1"] = round(
                            best["decode_tokens_per_s"] / ours1, 3)
                    if batch == 1:  # at batch B one weight read serves B tokens: no roofline
                        ctx = prompt + args.gen_tokens // 2  # mean context while decoding
                        ours_bytes = bytes_per_token(
                            path, 1.0 if rows[-1].get("lm_head") == "int8" else 2.0, ctx,
                            rows[-1].get("kv_cache", "float16"))
                        roof = bw[threads] * 1e9 / sum(ours_bytes.values())
                        summary.update({"ours_bytes_per_token": ours_bytes,
                                        "ours_roofline_tokens_per_s": round(roof, 1),
                                        "ours_roofline_fraction": round(
                                            best["decode_tokens_per_s"] / roof, 3)})
                        if peer:
                            summary.update(_versus("bench", best, peer))
                    got = [r[batch] for r in peer_b if batch in r]
                    if got:
                        summary.update(_versus("batched", best, got))
                    print(json.dumps(summary), flush=True)
    return 0


def _versus(tool: str, best: dict, peer_rows: list) -> dict:
    """llama_<tool>_* (the peer's best rounds) and our ratios to them, decode and prefill."""
    out = {}
    for kind in ("decode", "prefill"):
        key = f"{kind}_tokens_per_s"
        theirs = _best(peer_rows, key)
        out[f"llama_{tool}_{key}"] = round(theirs, 2)
        out[f"{kind}_ratio_llama_{tool}"] = round(best[key] / theirs, 3)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
