# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Kernels and speed
#
# The ternary matmul `ternary_matmul(x_q [M, I] int8, packed [O/4, I] uint8) -> [M, O] int32` has
# several implementations behind one signature: the plain XLA path (unpack in-graph, int8 dot),
# the packed CPU kernel through `jax.ffi`, and a Pallas GPU kernel. They agree bit for bit; here
# we check that and time them, then time whole-model decoding at several batch sizes.

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bitnet_jax as bj
from bitnet_jax import kernels
from bitnet_jax.quant import pack_ternary
from bitnet_jax import DEFAULT_MODEL
from bitnet_jax.kernels.cpu import ffi as cpu_ffi

print("FFI kernel:", cpu_ffi.available() and cpu_ffi.isa(), cpu_ffi.unavailable_reason() or "")
impls = ["xla"] + (["ffi"] if cpu_ffi.available() else [])

# %% [markdown]
# ## Parity and timing on a 2B4T-sized FFN matrix (O=6912, I=2560)

# %%
rng = np.random.default_rng(0)
O, I = 6912, 2560
t = rng.integers(-1, 2, (O, I)).astype(np.int8)
packed = pack_ternary(jnp.asarray(t))


def timed(fn, *args, reps=5):
    fn(*args).block_until_ready()
    best = 1e9
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


ms = {k: [] for k in impls}
rows = [1, 2, 4, 8, 16, 32]
for m in rows:
    x = jnp.asarray(rng.integers(-127, 128, (m, I)).astype(np.int8))
    outs = {}
    for k in impls:
        fn = jax.jit(lambda a, b, k=k: kernels.ternary_matmul(a, b, kernel=k))
        outs[k] = np.asarray(fn(x, packed))
        ms[k].append(timed(fn, x, packed))
    assert all((outs[k] == outs["xla"]).all() for k in impls), "kernels disagree"
    print(f"M={m:3d}  " + "  ".join(f"{k}: {ms[k][-1]:6.2f} ms" for k in impls))

plt.figure(figsize=(6, 3))
for k in impls:
    plt.plot(rows, ms[k], marker="o", label=k)
plt.xscale("log", base=2)
plt.xlabel("rows M (tokens)")
plt.ylabel("ms per call")
plt.title(f"ternary matmul {O}x{I}")
plt.legend()
plt.show()

# %% [markdown]
# ## Whole-model decoding: batch size and kernel

# %%
path = os.environ.get("BITNET_JAX_NOTEBOOK_MODEL", str(DEFAULT_MODEL))
model = bj.load_model(path)
from bitnet_jax.runtime.benchmark import benchmark  # noqa: E402

speed = {k: [] for k in impls}
batches = [1, 2, 4, 8]
for k in impls:
    policy = bj.Policy(kernel=k, lm_head="int8")
    for b in batches:
        stats = benchmark(model, prompt_tokens=32, gen_tokens=16, batch=b, backend="cpu",
                          policy=policy)
        speed[k].append(stats["decode_tokens_per_s"])
        print(f"{k:4s} batch {b}: decode {stats['decode_tokens_per_s']:7.1f} tok/s, "
              f"prefill {stats['prefill_tokens_per_s']:7.1f} tok/s")

plt.figure(figsize=(6, 3))
width = 0.8 / len(impls)
for j, k in enumerate(impls):
    plt.bar(np.arange(len(batches)) + j * width, speed[k], width, label=k)
plt.xticks(np.arange(len(batches)) + width * (len(impls) - 1) / 2, batches)
plt.xlabel("batch")
plt.ylabel("decode tokens/s (all rows)")
plt.title("default model decode throughput")
plt.legend()
plt.show()
