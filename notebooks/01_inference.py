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
# # 01 · Inference walkthrough
#
# Load the bundled default BitNet b1.58 model, tokenize a prompt, step through the first
# decoder layer by hand, look at the ternary weights and the int8 activation scales, and
# generate text. Set `BITNET_JAX_NOTEBOOK_MODEL` to run it on another HF folder or GGUF file.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bitnet_jax as bj
from bitnet_jax import quant
from bitnet_jax.model import layers
from bitnet_jax.model import transformer as M
from bitnet_jax.model import params as P
from bitnet_jax.model.cache import attention_mask
from bitnet_jax import DEFAULT_MODEL

path = os.environ.get("BITNET_JAX_NOTEBOOK_MODEL", str(DEFAULT_MODEL))
model = bj.load_model(path)
cfg, tok = model.config, model.tokenizer
print(cfg.architecture, f"D={cfg.hidden_size} F={cfg.intermediate_size} L={cfg.num_hidden_layers}",
      f"N={cfg.num_attention_heads} K={cfg.num_key_value_heads} V={cfg.vocab_size}")
print(f"{P.count_params(model.params):,} weights")

# %% [markdown]
# ## Tokenize
# The tokenizer came from the GGUF metadata. `add_special=True` prepends BOS.

# %%
prompt = "And God said"
ids = tok.encode(prompt, add_special=True)
print(ids)
print([tok.token_to_piece(i) for i in ids])
tokens = jnp.array([ids], jnp.int32)  # [B=1, T]

# %% [markdown]
# ## Next-token distribution from a full forward pass

# %%
logits = bj.forward(model.params, tokens, cfg)  # [1, T, V] float32
probs = jax.nn.softmax(logits[0, -1])
top = np.argsort(-np.asarray(probs))[:8]
for i in top:
    print(f"{tok.decode([int(i)])!r:>12}  {float(probs[i]):.3f}")

# %% [markdown]
# ## Ternary weights
# Each BitLinear weight is stored packed: 2 bits per weight (codes t+1 along the output axis)
# plus one float32 scale per matrix, so W = scale · t with t in {-1, 0, +1}.

# %%
p0 = P.layer(model.params, 0)  # layer 0's params, un-stacked
names = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
fractions = {}
for mod, name in names:
    leaf = p0[mod][name]
    t = np.asarray(quant.unpack_ternary(leaf["packed"]))
    fractions[name] = [(t == v).mean() for v in (-1, 0, 1)]
    print(f"{name:10s} {str(t.shape):14s} scale={float(leaf['scale']):.4f} "
          f"-1/0/+1 = {fractions[name][0]:.2f}/{fractions[name][1]:.2f}/{fractions[name][2]:.2f}")

fig, ax = plt.subplots(figsize=(7, 3))
bottom = np.zeros(len(names))
for j, (label, color) in enumerate(zip(("-1", "0", "+1"), ("tab:blue", "tab:gray", "tab:red"))):
    vals = np.array([fractions[n][j] for _, n in names])
    ax.bar([n for _, n in names], vals, bottom=bottom, label=label, color=color)
    bottom += vals
ax.set_ylabel("fraction of weights")
ax.set_title("Layer 0 ternary weights")
ax.legend(ncol=3)
plt.show()

# %% [markdown]
# ## Step through layer 0 by hand
# The same pure functions the model scans over: embed, RMSNorm, int8 activation quantisation,
# BitLinear projections, RoPE, attention (with its sub-norm), the gated FFN.

# %%
policy = bj.get_policy("cpu")
x = M.embed(model.params, tokens, policy)  # [1, T, D]
a = layers.rms_norm(x, p0["input_layernorm"], cfg.rms_norm_eps)
x_q, step = quant.quantize_activations(a)  # int8 [1, T, D], step [1, T, 1]
print("int8 range:", int(x_q.min()), int(x_q.max()))

fig, ax = plt.subplots(1, 2, figsize=(10, 3))
ax[0].bar(range(len(ids)), np.asarray(step[0, :, 0]) * 127)
ax[0].set_xticks(range(len(ids)), [tok.token_to_piece(i) for i in ids], rotation=45)
ax[0].set_title("per-token absmax (activation scale · 127)")
ax[1].hist(np.asarray(x_q).ravel(), bins=64)
ax[1].set_title("int8 activations into q/k/v")
plt.tight_layout()
plt.show()

# %%
t = tokens.shape[1]
positions = jnp.arange(t, dtype=jnp.int32)[None, :]
cos, sin = layers.rope_frequencies(positions, cfg.head_dim, cfg.rope_theta)
mask = attention_mask(jnp.zeros((1,), jnp.int32), t, t)
x1, _ = M.block(p0, x, cos, sin, mask, cfg, policy)  # [1, T, D]: layer 0's output

# Cross-check: running a one-layer slice of the params through the scanned model gives the same.
one = {**model.params, "layers": jax.tree.map(lambda w: w[:1], model.params["layers"])}
h, _ = M.apply(one, tokens, cfg.replace(num_hidden_layers=1), policy)
ref = layers.rms_norm(x1, model.params["norm"], cfg.rms_norm_eps)
print("max |by hand - scanned| =", float(jnp.abs(ref - h).max()))
print("residual norm per token after layer 0:", np.round(np.linalg.norm(np.asarray(x1[0]), axis=-1), 2))

# %% [markdown]
# ## Generate
# Prefill and decode run in jitted chunks with a KV cache; `stream` yields text as it comes.

# %%
for piece in bj.stream(model, prompt, max_new_tokens=48, temperature=0.8, seed=0):
    print(piece, end="", flush=True)
print()
result = bj.generate(model, [prompt, "Blessed are"], max_new_tokens=24, temperature=0)
for r in result:
    print(repr(r.text), r.finish_reason, f"{r.timings.tokens_per_s:.0f} tok/s")
