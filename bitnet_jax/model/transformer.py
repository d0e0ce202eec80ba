"""BitNet b1.58 (and plain Llama) as pure functions over a parameter pytree.

Dimension letters used in docstrings and einsums:
  B batch · T query positions in this call · S key/value positions (cache length) · D hidden_size
  F intermediate_size · N query heads · K key/value heads · G = N/K · H head_dim · V vocab
  L layers · O, I a linear's output / input features

The model is Llama with four differences (bitnet-spec §1.2, §1.4): every projection is a
BitLinear (bitlinear.py; the formulas are in quant.py), an RMSNorm before o_proj (attn_sub_norm)
and before down_proj (ffn_sub_norm) when `cfg.use_sub_norms`, and relu² instead of SiLU gating
for 2B4T. The KV cache (cache.py) is scan state: every layer returns the updated cache.

Params (HF names, per-layer leaves stacked on a leading L axis; W = a BitLinear leaf, latent
float [L, O, I] or packed {"packed": uint8 [L, O/4, I], "scale": f32 [L]}):

  embed_tokens [V, D]
  layers:
    input_layernorm [L, D]
    self_attn: q_proj W[N·H, D], k_proj W[K·H, D], v_proj W[K·H, D], o_proj W[D, N·H],
               attn_sub_norm [L, D] (sub-norm models only)
    post_attention_layernorm [L, D]
    mlp: gate_proj W[F, D], up_proj W[F, D], down_proj W[D, F], ffn_sub_norm [L, F] (ditto)
  norm [D]
  lm_head [V, D] (untied models only)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitnet_jax import kernels
from bitnet_jax.kernels.stacked import scan_layers
from bitnet_jax.model import cache as kv_cache
from bitnet_jax.model import fused
from bitnet_jax.model.attention import attention
from bitnet_jax.model.bitlinear import bitlinear_many, whole_norms
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.layers import rms_norm, rope_frequencies
from bitnet_jax.model.policy import Policy, get_policy
from bitnet_jax.quant import quantize_activations


def embed(params: dict, tokens: jax.Array, policy: Policy) -> jax.Array:
    """Look up token embeddings: tokens [B, T] int32 -> [B, T, D] in the compute dtype.

    The table is a float [V, D] array, or an int8 row-scaled {"q8", "scale"} copy
    (params.quantize_lm_head on a tied model), whose gathered rows are dequantised.
    """
    table = params["embed_tokens"]
    if isinstance(table, dict):
        rows = jnp.take(table["q8"], tokens, axis=0).astype(jnp.float32)
        return (rows * jnp.take(table["scale"], tokens, axis=0)[..., None]).astype(policy.compute)
    return jnp.take(table, tokens, axis=0).astype(policy.compute)


def feed_forward(p: dict, x: jax.Array, cfg: ModelConfig, policy: Policy, *,
                 norm: jax.Array | None = None, residual: jax.Array | None = None) -> jax.Array:
    """Gated FFN: down(sub_norm(act(gate(x)) · up(x))).

    Args:
      p: this layer's `mlp` params (gate/up/down_proj, optional ffn_sub_norm [F]).
      x: [B, T, D] normalised residual stream (the raw stream with `norm`).
      norm: None or the RMSNorm gain [D] to apply to x first (post_attention_layernorm).
      residual: None or [B, T, D]: returned plus the FFN's output.

    Returns:
      [B, T, D] (+ residual).
    """
    eps = cfg.rms_norm_eps
    # relu² (2B4T) grows fast: the product is computed in float32, never float16.
    hidden = bitlinear_many(x, [p["gate_proj"], p["up_proj"]], policy, cfg.quantized, norm=norm,
                            eps=eps, act=cfg.hidden_act)[0]  # [B, T, F]
    sub = p["ffn_sub_norm"] if cfg.use_sub_norms else None
    return bitlinear_many(hidden, [p["down_proj"]], policy, cfg.quantized, norm=sub, eps=eps,
                          residual=residual)[0]


def block(p: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
          cfg: ModelConfig, policy: Policy, cache: dict | None = None, *, layer=None, pos=None,
          slot=None) -> tuple[jax.Array, dict | None]:
    """One pre-norm decoder layer: x + attn(norm(x)), then + ffn(norm(x)).

    Args:
      p: this layer's params; x: [B, T, D]; cos, sin: [B, T, H]; mask: [B, T, S].
      cache, layer, pos, slot: the KV cache and where this call writes (attention.attention).

    Returns:
      (x [B, T, D], the updated cache or None).
    """
    # The norms and residual adds go into the projections' kernel calls where they can
    # (bitlinear_many): the same math as x += attn(rms_norm(x)); x += ffn(rms_norm(x)).
    x, cache = attention(p["self_attn"], x, cos, sin, mask, cfg, policy, cache, layer=layer,
                         pos=pos, slot=slot, norm=p["input_layernorm"], residual=x)
    return feed_forward(p["mlp"], x, cfg, policy, norm=p["post_attention_layernorm"],
                        residual=x), cache


def apply(params: dict, tokens: jax.Array, cfg: ModelConfig, policy: Policy | str | None = None,
          *, cache: dict | None = None, pos=None, slot=None):
    """Run the decoder stack and the final norm.

    Args:
      params: model params (module docstring).
      tokens: [B, T] int32 token ids.
      cfg: model config (static under jit).
      policy: precision policy or preset name.
      cache: optional KV cache {"k", "v"} [L, B', K, S, H] (model/cache.py). Row i's tokens go
        to positions pos[i]..pos[i]+T-1 of cache row i (slot None, B == B') or, for a one-row
        call, of cache row `slot`; each query attends to its row's positions 0..its own.
        Without a cache, attention is causal over the T tokens.
      pos: [B] int32 position of each row's first token (default all 0); also the RoPE offset.
      slot: int32 scalar cache row of a one-row call (cache only).

    Returns:
      (h, cache): h [B, T, D] after the final RMSNorm, and the updated cache (or None).
    """
    policy = get_policy(policy)
    b, t = tokens.shape
    pos = jnp.zeros((b,), jnp.int32) if pos is None else jnp.asarray(pos, jnp.int32)
    s = t if cache is None else cache["k"].shape[3]
    cos, sin = rope_frequencies(kv_cache.positions(pos, t), cfg.head_dim, cfg.rope_theta)
    # Without a cache keys are this call's tokens: key j sits at position pos + j.
    mask = kv_cache.attention_mask(pos if cache is not None else jnp.zeros_like(pos), t, s)
    if slot is not None:
        slot = jnp.asarray(slot, jnp.int32)

    def layer_step(p, layer, carry):
        x, cache = carry
        return block(p, x, cos, sin, mask, cfg, policy, cache, layer=layer, pos=pos, slot=slot)

    x = embed(params, tokens, policy)
    if fused.usable(params["layers"], x, cache, cfg, policy, slot):  # GPU decode: 5 launches/layer
        x, cache = fused.decode_layers(params["layers"], x, cache, pos, cos, sin, cfg)
    else:
        x, cache = scan_layers(layer_step, params["layers"], (x, cache),
                               whole=whole_norms(params["layers"], x, policy))
    return rms_norm(x, params["norm"], cfg.rms_norm_eps), cache


def unembed(params: dict, h: jax.Array, cfg: ModelConfig, policy: Policy | str | None = None):
    """LM head: h [..., D] -> float32 logits [..., V] (tied embedding or lm_head)."""
    policy = get_policy(policy)
    w = params["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    lead = h.shape[:-1]
    h2 = h.reshape(-1, h.shape[-1])  # [M, D] for the CPU kernels
    if isinstance(w, dict):  # int8 row-scaled copy (params.quantize_lm_head)
        if kernels.int8_linear_usable(policy.kernel, h2, w["q8"]):  # the same, in one CPU call
            logits = kernels.int8_linear(h2, w["q8"], w["scale"])
        else:
            h_q, step = quantize_activations(h2)
            acc = kernels.int8_matmul(h_q, w["q8"], kernel=policy.kernel)  # [M, V] int32
            logits = acc.astype(jnp.float32) * step * w["scale"][None, :]
        return logits.reshape(*lead, -1).astype(policy.output)
    # float32 where the table, the compute or the param dtype is (a 16-bit table that a float32
    # policy kept, params.table_dtype, is widened exactly), else the compute dtype (bfloat16).
    wide = jnp.float32 in (w.dtype, policy.compute, policy.param)
    dtype = jnp.float32 if wide else policy.compute
    h2 = h2.astype(dtype)
    if dtype != w.dtype and kernels.half_linear_usable(policy.kernel, h2, w):  # one CPU call
        return kernels.half_linear(h2, w).reshape(*lead, -1).astype(policy.output)
    logits = jnp.einsum("...d,vd->...v", h.astype(dtype), w.astype(dtype),
                        preferred_element_type=jnp.float32)
    return logits.astype(policy.output)


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig,
            policy: Policy | str | None = None) -> jax.Array:
    """Logits of a whole sequence, no cache, positions 0..T-1.

    Args:
      params: model params (latent or packed BitLinear leaves).
      tokens: [B, T] int32.
      cfg: model config.
      policy: precision policy or preset name (default "cpu", float32).

    Returns:
      [B, T, V] float32 logits.
    """
    h, _ = apply(params, jnp.asarray(tokens, jnp.int32), cfg, policy)
    return unembed(params, h, cfg, policy).astype(jnp.float32)
