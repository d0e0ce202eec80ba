"""The decode step's decoder layers as five GPU launches each (kernel "pallas" / "auto" on a GPU).

Same math as transformer.block over attention.attention and feed_forward, regrouped around
the BitLinears so that every norm, quantisation, dequantisation, residual add and activation
sits inside a kernel (kernels/gpu/fused.py) and RoPE plus the cache write inside the attention
(kernels/gpu/decode_attention.py):

  qkv = BitLinear_qkv(input_layernorm(x))                  fused_bitlinear, 3 weights
  a, cache = attention(RoPE(q), RoPE(k) -> cache, v -> cache)   decode_attention
  x = x + BitLinear_o(attn_sub_norm(a))                    fused_bitlinear, residual
  h = act(BitLinear_gate(m)) · BitLinear_up(m), m = post_attention_layernorm(x)   act
  x = x + BitLinear_down(ffn_sub_norm(h))                  fused_bitlinear, residual

The layer loop is unrolled (the layer index is a constant per copy): XLA's while loop would add
a counter kernel per layer and its condition per step. Every per-layer array (weights, scales,
norm gains, the cache) is passed whole and read at the layer index inside the kernels, so no
slice or copy runs between them. Why: kernels/gpu/fused.py (832 -> 171 launches per 2B4T
decode step at batch 1; benchmarks/README.md, compile-only H100).

Used by transformer.apply for a decode step (T = 1, B <= 16 rows, no slot, packed weights, one
device) when `kernels.fused_decode` says the kernels take the shapes (and, under "auto", that
they compile for the target); everything else runs the composed path.
"""

from __future__ import annotations

import jax

from bitnet_jax import kernels
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.layers import activation
from bitnet_jax.model.policy import Policy
from bitnet_jax.quant import is_packed


def _relu2(x):
    return activation("relu2", x)


def _silu(x):
    return activation("silu", x)


# Module-level functions: the kernel takes the activation as a static (hashed) argument.
_ACTS = {"relu2": _relu2, "silu": _silu}


def usable(layers: dict, x: jax.Array, cache: dict | None, cfg: ModelConfig, policy: Policy,
           slot) -> bool:
    """True if this call of transformer.apply is a decode step the fused layers run.

    Args:
      layers: the stacked per-layer params; x: [B, T, D] the embedded tokens.
      cache: the KV cache or None; slot: None or the one-row call's cache row.
    """
    if cache is None or slot is not None or x.shape[1] != 1 or not cfg.quantized:
        return False
    if cfg.hidden_act not in _ACTS:
        return False
    attn, mlp = layers["self_attn"], layers["mlp"]
    weights = [attn[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    weights += [mlp[n] for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(is_packed(w) and w["packed"].ndim == 3 for w in weights):
        return False  # latent (training) or blocked (sharded) weights
    return kernels.fused_decode(policy.kernel, policy.compute, x.shape[0],
                                [w["packed"] for w in weights], cache["k"],
                                cfg.num_attention_heads)


def decode_layers(layers: dict, x: jax.Array, cache: dict, pos: jax.Array, cos: jax.Array,
                  sin: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """All decoder layers of one decode step.

    Args:
      layers: the stacked per-layer params (transformer.py docstring), packed weights.
      x: [B, 1, D] embedded tokens in the compute dtype.
      cache: {"k", "v"} [L, B', K, S, H]; row b of x is cache row b.
      pos: [B] int32 position of each row's token; cos, sin: [B, 1, H] RoPE tables.
      cfg: model config.

    Returns:
      (x [B, 1, D] before the final norm, the updated cache).
    """
    b = x.shape[0]
    attn, mlp = layers["self_attn"], layers["mlp"]
    eps = cfg.rms_norm_eps
    sub = cfg.use_sub_norms

    def linear(inp, names, group, layer, norm, **kw):
        ws = [group[n] for n in names]
        return kernels.fused_bitlinear(inp, [w["packed"] for w in ws], [w["scale"] for w in ws],
                                       layer, norm=norm, eps=eps, **kw)

    def layer_step(layer, carry):
        x, k, v = carry
        qkv = linear(x, ("q_proj", "k_proj", "v_proj"), attn, layer, layers["input_layernorm"])
        a, k, v = kernels.decode_attention(qkv, cos[:, 0], sin[:, 0], k, v, layer, pos,
                                           heads=cfg.num_attention_heads)
        x = linear(a, ("o_proj",), attn, layer, attn["attn_sub_norm"] if sub else None,
                   residual=x)
        h = linear(x, ("gate_proj", "up_proj"), mlp, layer, layers["post_attention_layernorm"],
                   act=_ACTS[cfg.hidden_act])
        x = linear(h, ("down_proj",), mlp, layer, mlp["ffn_sub_norm"] if sub else None,
                   residual=x)
        return x, k, v

    x, k, v = jax.lax.fori_loop(0, cfg.num_hidden_layers, layer_step,
                                (x.reshape(b, -1), cache["k"], cache["v"]), unroll=True)
    return x.reshape(b, 1, -1), {"k": k, "v": v}
