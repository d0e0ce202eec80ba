"""The model as pure functions over a parameter pytree (Llama with BitNet's differences).

  config.py       ModelConfig (HF config.json fields), presets
  policy.py       Policy: parameter / compute / output / KV-cache dtypes, kernel and LM-head choice
  params.py       parameter shapes, random init, packing, the int8 LM-head copy
  layers.py       RMSNorm, RoPE, FFN activations
  bitlinear.py    BitLinear (formulas in bitnet_jax/quant.py, matmuls in bitnet_jax/kernels)
  cache.py        the KV cache: slot rows, allocation, the attention mask, writes
  sharding.py     tensor / data parallelism: the mesh, the sharding rules for params and state
  attention.py    GQA attention with attn_sub_norm; returns (out, new_cache)
  transformer.py  embed, block, apply (the layer scan), unembed, forward
  nnx.py          a Flax NNX BitLinear layer (needs the [train] extra)

This __init__ imports nothing, so `bitnet_jax.model.quant`-level modules load without the layers
above them (README, Design: the import order).
"""
