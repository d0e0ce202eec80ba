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
# # 02 · Quantization-aware fine-tuning
#
# Fine-tune the bundled default BitNet on a short text with QAT: latent float32 master weights,
# absmean ternary weights and per-token int8 activations in every forward pass, gradients through
# straight-through estimators, AdamW from optax. Then pack the result back to 2-bit weights and
# check it still generates.

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import bitnet_jax as bj
from bitnet_jax import train
from bitnet_jax import DEFAULT_MODEL

path = os.environ.get("BITNET_JAX_NOTEBOOK_MODEL", str(DEFAULT_MODEL))
model = bj.load_model(path, packed=False)  # latent float weights t·σ, for training
cfg, tok = model.config, model.tokenizer
# Loaded ternary matrices t·σ would shrink by mean|t| when re-quantised; undo that once.
params = train.latent_from_ternary(model.params)

# %% [markdown]
# A small text to learn (Lincoln's Gettysburg Address, public domain).

# %%
text = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that "
    "war. We have come to dedicate a portion of that field, as a final resting place for those "
    "who here gave their lives that that nation might live. It is altogether fitting and proper "
    "that we should do this."
)
ids = np.array(tok.encode(text, add_special=True), np.int32)
seq = 32
windows = np.stack([ids[i:i + seq + 1] for i in range(0, len(ids) - seq - 1, 4)])
print(len(ids), "tokens,", windows.shape[0], "windows of", seq + 1)

# %%
policy = bj.get_policy("cpu")
steps = 40
optimizer, schedule = train.make_optimizer(lr=1e-3, warmup_steps=5, steps=steps, min_lr_ratio=0.1,
                                           weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8,
                                           clip_norm=1.0)
opt_state = optimizer.init(params)
before = float(train.loss_fn(params, jnp.asarray(windows), cfg, policy))
rng = np.random.default_rng(0)
losses = []
for step in range(steps):
    batch = windows[rng.choice(len(windows), size=8)][None]  # [A=1, B=8, T+1]
    params, opt_state, stats = train.train_step(params, opt_state, jnp.asarray(batch), cfg,
                                                policy, optimizer)
    losses.append(float(stats["loss"]))
after = float(train.loss_fn(params, jnp.asarray(windows), cfg, policy))
print(f"loss on the text: {before:.3f} -> {after:.3f} nats/token "
      f"(perplexity {np.exp(before):.1f} -> {np.exp(after):.1f})")

# %%
plt.figure(figsize=(6, 3))
plt.plot(losses)
plt.xlabel("step")
plt.ylabel("training loss (nats/token)")
plt.title("QAT fine-tuning")
plt.show()

# %% [markdown]
# ## Back to inference form
# `pack_params` ternarises each latent matrix (absmean) and packs it to 2 bits per weight: the
# exact weights the QAT forward pass used. The packed path computes the product in int32 and the
# latent path in float32, so an activation sitting on an int8 rounding tie can round differently:
# the logits agree closely, not bit for bit.

# %%
packed = bj.pack_params(params, cfg)
sample = jnp.asarray(windows[:2, :-1])
diff = jnp.abs(bj.forward(packed, sample, cfg) - bj.forward(params, sample, cfg)).max()
print("max |packed - latent| logits:", float(diff))
tuned = bj.Model(cfg, packed, tok, policy, "fine-tuned")
print(bj.generate(tuned, "Four score and seven", max_new_tokens=24, temperature=0)[0].text)
