"""The Python API with its default policy: peak memory and decode speed of `generate`.

`bitnet-jax bench` (bench_cpu.py) measures the CLI's CPU defaults (int8 LM head, float16 KV
cache); a notebook calling `bj.load_model(path)` and `bj.generate(...)` gets the exact default
(float LM head, float32 cache). One JSON line per run:

  {"model": ..., "batch": B, "embed_dtype": ..., "load_rss_mib": ..., "peak_rss_mib": ...,
   "file_mib": ..., "peak_over_file": ..., "decode_tokens_per_s": ..., "prompt_tokens": ...,
   "gen_tokens": ..., "device": ..., "jax_version": ...}

decode_tokens_per_s is over all rows (the timing `generate` reports, after one warm-up call
that compiles). Run each batch size in its own process (peak RSS is per process):

  python benchmarks/bench_python_api.py --model random-2b4t-bitnet-tq2_0.gguf --batch 1
  python benchmarks/bench_python_api.py --model random-2b4t-bitnet-tq2_0.gguf --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

import bitnet_jax as bj  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file or HF folder")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-words", type=int, default=32, help="words of the prompt")
    ap.add_argument("--gen-tokens", type=int, default=32)
    args = ap.parse_args()
    model = bj.load_model(args.model)
    load_rss = _rss_mib()
    prompts = [" ".join(["once upon a time"] * (args.prompt_words // 4))] * args.batch
    bj.generate(model, prompts, max_new_tokens=2)  # compiles
    results = bj.generate(model, prompts, max_new_tokens=args.gen_tokens)
    timings = results[0].timings
    path = Path(args.model)
    file_mib = (sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir()
                else path.stat().st_size) / 2**20
    peak = _rss_mib()
    table = model.params["embed_tokens"]
    print(json.dumps({
        "model": str(path.name), "batch": args.batch,
        "embed_dtype": str(getattr(table, "dtype", "int8")),
        "load_rss_mib": round(load_rss, 1), "peak_rss_mib": round(peak, 1),
        "file_mib": round(file_mib, 1), "peak_over_file": round(peak / file_mib, 3),
        "decode_tokens_per_s": round(timings.tokens_per_s * args.batch, 2),
        "prompt_tokens": results[0].prompt_tokens, "gen_tokens": args.gen_tokens,
        "device": str(jax.devices()[0]), "cpus": os.cpu_count(),
        "jax_version": jax.__version__}))


if __name__ == "__main__":
    main()
