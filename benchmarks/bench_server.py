"""Our `bitnet-jax serve` against llama.cpp's `llama-server` on one TQ2_0 file, interleaved.

  python benchmarks/bench_server.py                 # large shape, concurrency 1, 4, 16
  python benchmarks/bench_server.py --short --concurrency 1 4   # a few minutes

Both servers start as subprocesses on the same random-weight large-shaped TQ2_0 file
(make_random_gguf.py --shape large, written under ~/.cache/bitnet_jax/bench when missing) with
the same number of slots (`--slots N` / `--parallel N -cb`, N = the largest concurrency) and the
same per-slot context, on the same threads. Each run sends the same requests to both: token-id
prompts of 32-512 tokens (uniform, fresh each round, so llama-server's prompt cache cannot
help; it also runs with --no-cache-prompt), 128 output tokens with `ignore_eos`, streamed
through /v1/completions, `concurrency` at a time. Rounds alternate the two servers, so load
from other work on the machine falls on both alike.

Per (server, concurrency, round) one JSON line: aggregate output tokens/s (all output tokens
over the wall time from the first request sent to the last token received), time to first
token (TTFT) p50/p99, inter-token latency (ITL: the gaps between consecutive streamed chunks,
vLLM benchmark_serving's definition; our server sends several tokens per chunk) p50/p99, and
time per output token (TPOT: (last - first token) / (tokens - 1) per request) p50/p99. Then one
summary line per concurrency with medians over rounds and our/llama ratios. The first line
records the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py, beside this script)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "bitnet_jax"
LLAMA_SERVER = CACHE / "llamacpp" / "build" / "bin" / "llama-server"
MODEL = CACHE / "bench" / "random-large-bitnet-tq2_0.gguf"
VOCAB = 32000


def _cpus(spec: str) -> set[int]:
    out = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ------------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ours(model: Path, slots: int, ctx: int, log: Path,
               pin: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = pin + [sys.executable, "-m", "bitnet_jax", "serve", "--model", str(model), "--port",
           str(port), "--slots", str(slots), "--ctx-size", str(ctx), "--max-queue", "4096",
           "--timeout", "3600"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def start_llama(exe: Path, model: Path, slots: int, ctx: int, threads: int,
                log: Path, pin: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = pin + [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t",
           str(threads), "-tb", str(threads), "--parallel", str(slots), "-cb", "-c",
           str(ctx * slots), "--no-cache-prompt", "-ngl", "0"]
    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parent))
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 1800) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); log: {log}\n"
                             + log.read_text()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.time() - t0
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit(f"server at {url} not healthy after {timeout} s; log: {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ------------------------------------------------------------------------------------------------
# Load


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                      gen: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0,
            "ignore_eos": True, "stream": True, "cache_prompt": False,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals, tokens, finish = [], None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                if choice.get("text"):
                    arrivals.append(time.perf_counter())
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    tokens = tokens if tokens is not None else gen
    ttft = arrivals[0] - t0 if arrivals else end - t0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    tpot = (arrivals[-1] - arrivals[0]) / (tokens - 1) if len(arrivals) > 1 and tokens > 1 \
        else 0.0
    return {"ttft": ttft, "gaps": gaps, "tpot": tpot, "tokens": tokens, "finish": finish,
            "end": end}


async def run_level(url: str, model: str, prompts: list[list[int]], gen: int,
                    concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    # A fresh connection per request: no race with a server closing an idle keep-alive one.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:

        async def guarded(p):
            async with sem:
                return await one_request(client, url, model, p, gen)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(p) for p in prompts))
    wall = max(r["end"] for r in results) - t0
    out_tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tpot = [r["tpot"] for r in results]
    return {"requests": len(results), "output_tokens": out_tokens, "wall_s": round(wall, 3),
            "tok_s": round(out_tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 0.5), 4),
            "ttft_p99_s": round(percentile(ttft, 0.99), 4),
            "itl_p50_s": round(percentile(gaps, 0.5), 4),
            "itl_p99_s": round(percentile(gaps, 0.99), 4),
            "tpot_p50_s": round(percentile(tpot, 0.5), 4),
            "tpot_p99_s": round(percentile(tpot, 0.99), 4),
            "finish": sorted({r["finish"] for r in results}),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def model_id(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per run (default: max(4, 2 x concurrency))")
    ap.add_argument("--rounds", type=int, default=2, help="runs per server and concurrency")
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="llama-server threads (default: all cores; with --pin: its CPU count)")
    ap.add_argument("--pin", metavar="CPUS",
                    help="run both servers under `taskset -c CPUS` (e.g. 1): llama.cpp's "
                    "spinning thread pool collapses when other processes share its cores")
    ap.add_argument("--short", action="store_true",
                    help="prompts 32-128, 32 output tokens, 1 round (a few minutes)")
    ap.add_argument("--logs", type=Path, default=Path("/tmp"))
    args = ap.parse_args(argv)
    # SIGTERM (or SIGINT, ignored in background jobs) unwinds, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.short:
        args.prompt_max, args.gen, args.rounds = 128, 32, 1
    if not args.model.exists():
        args.model.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_random_gguf.py"),
                        str(args.model), "--shape", "large", "--type", "tq2_0"], check=True)
    if not args.llama_server.exists():
        raise SystemExit(f"{args.llama_server} is missing; build it with "
                         "`nice bash benchmarks/build_llamacpp.sh`.")
    pin = ["taskset", "-c", args.pin] if args.pin else []
    if args.pin:
        args.threads = len(os.sched_getaffinity(0) & _cpus(args.pin)) or 1
    slots = max(args.concurrency)
    ctx = 1 << (args.prompt_max + args.gen - 1).bit_length()  # our cache bucket per slot
    import jax  # only for the machine record

    version = subprocess.run([str(args.llama_server), "--version"], capture_output=True,
                             text=True, env=dict(os.environ, LD_LIBRARY_PATH=str(
                                 args.llama_server.parent))).stderr.strip().splitlines()
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
               "jax": jax.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d"), "pin": args.pin,
               "llama_server": " ".join(version[-2:]),
               "model": str(args.model), "slots": slots, "ctx_per_slot": ctx,
               "gen": args.gen, "prompt_tokens": [args.prompt_min, args.prompt_max],
               "note": "shared 2-core machine: other engineers' jobs ran at the same time"}
    print(json.dumps({"machine": machine}), flush=True)

    ours_log, llama_log = args.logs / "bench_server_ours.log", args.logs / "bench_server_llama.log"
    servers, procs = {}, []
    try:
        for name, start, log in (
                ("ours", lambda: start_ours(args.model, slots, ctx, ours_log, pin), ours_log),
                ("llama", lambda: start_llama(args.llama_server, args.model, slots, ctx,
                                              args.threads, llama_log, pin), llama_log)):
            proc, url = start()
            procs.append(proc)
            ready_s = wait_healthy(proc, url, log)
            servers[name] = (proc, url, model_id(url))
            print(json.dumps({"server": name, "ready_s": round(ready_s, 1)}), flush=True)
        rng = random.Random(0)
        for name, (_, url, mid) in servers.items():  # one short warm request each
            asyncio.run(run_level(url, mid, [[rng.randrange(100, VOCAB) for _ in range(40)]],
                                  8, 1))
        summary: dict = {}
        for c in args.concurrency:
            n = args.requests or max(4, 2 * c)
            for r in range(args.rounds):
                prompts = [[rng.randrange(100, VOCAB) for _ in range(
                    rng.randint(args.prompt_min, args.prompt_max))] for _ in range(n)]
                order = ["ours", "llama"] if r % 2 == 0 else ["llama", "ours"]
                for name in order:
                    _, url, mid = servers[name]
                    stats = asyncio.run(run_level(url, mid, prompts, args.gen, c))
                    stats.update(server=name, concurrency=c, round=r)
                    summary.setdefault((c, name), []).append(stats)
                    print(json.dumps(stats), flush=True)
        for c in args.concurrency:
            med = {name: {k: statistics.median(s[k] for s in summary[(c, name)]) for k in
                          ("tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
                           "tpot_p50_s", "tpot_p99_s")} for name in ("ours", "llama")}
            print(json.dumps({"summary": True, "concurrency": c, "ours": med["ours"],
                              "llama": med["llama"],
                              "tok_s_ratio": round(med["ours"]["tok_s"] / med["llama"]["tok_s"],
                                                   3),
                              "ttft_p50_ratio": round(med["ours"]["ttft_p50_s"]
                                                      / med["llama"]["ttft_p50_s"], 3)}),
                  flush=True)
    finally:
        for proc in procs:
            stop(proc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
