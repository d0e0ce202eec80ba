"""Parameter pytrees: shapes, random init, packing latent weights for inference.

The layout is documented in model.py. Latent float leaves are the QAT master weights; `pack_params`
turns every BitLinear leaf into the packed inference form {"packed", "scale"} (bitlinear.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.quant import is_packed, pack_weights, row_int8
from bitnet_jax.model.config import ModelConfig
from bitnet_jax.model.policy import Policy, get_policy

# (module, name) of every BitLinear projection inside params["layers"].
BITLINEAR_PATHS = (
    ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
    ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"),
)


def linear_shapes(cfg: ModelConfig) -> dict[tuple[str, str], tuple[int, int]]:
    """(O, I) of each BitLinear projection."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    n, k = cfg.num_attention_heads, cfg.num_key_value_heads
    return {
        ("self_attn", "q_proj"): (n * h, d), ("self_attn", "k_proj"): (k * h, d),
        ("self_attn", "v_proj"): (k * h, d), ("self_attn", "o_proj"): (d, n * h),
        ("mlp", "gate_proj"): (f, d), ("mlp", "up_proj"): (f, d), ("mlp", "down_proj"): (d, f),
    }


def param_shapes(cfg: ModelConfig) -> dict:
    """Pytree of shapes of the latent (float) params."""
    L, d, f, v = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {
        "embed_tokens": (v, d),
        "layers": {
            "input_layernorm": (L, d),
            "post_attention_layernorm": (L, d),
            "self_attn": {},
            "mlp": {},
        },
        "norm": (d,),
    }
    for (mod, name), (o, i) in linear_shapes(cfg).items():
        shapes["layers"][mod][name] = (L, o, i)
    if cfg.use_sub_norms:
        shapes["layers"]["self_attn"]["attn_sub_norm"] = (L, d)
        shapes["layers"]["mlp"]["ffn_sub_norm"] = (L, f)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (v, d)
    return shapes


def init_params(cfg: ModelConfig, rng: jax.Array, policy: Policy | str | None = None,
                std: float = 0.02) -> dict:
    """Random latent params: normal(0, std) weights, unit norm gains, in policy.param dtype."""
    policy = get_policy(policy)
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    rngs = jax.random.split(rng, len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    out = []
    for r, shape, path in zip(rngs, leaves, paths):
        if "norm" in path:
            out.append(jnp.ones(shape, policy.param))
        else:
            out.append((std * jax.random.normal(r, shape, jnp.float32)).astype(policy.param))
    return jax.tree.unflatten(treedef, out)


def pack_params(params: dict, cfg: ModelConfig) -> dict:
    """Ternarise and pack every latent BitLinear leaf (already-packed leaves are kept)."""
    if not cfg.quantized:
        return params
    out = dict(params)
    layers = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params["layers"].items()}
    for mod, name in BITLINEAR_PATHS:
        w = layers[mod][name]
        if not is_packed(w):
            layers[mod][name] = jax.jit(pack_weights)(w)
    out["layers"] = layers
    return out


# The [V, D] float tables: the embedding and an untied LM head.
TABLES = ("embed_tokens", "lm_head")


def table_dtype(stored, param_dtype) -> np.dtype:
    """The dtype an inference model keeps an embedding / LM head table in (the loaders and the
    placement's cast): a table stored in float16 or bfloat16 keeps it under a float32 param
    dtype, since widening it is exact (transformer.embed widens the gathered rows,
    transformer.unembed the table in its dot: kernels.half_linear on a CPU); otherwise the
    param dtype. It halves the bytes held and read per decode step (BitNet-2B4T's tied table:
    0.66 GB instead of 1.3). Training (latent params) widens every float leaf.
    """
    stored, param = np.dtype(stored), np.dtype(param_dtype)
    if param == np.float32 and stored in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16)):
        return stored
    return param


def placed_dtype(path, dtype, params: dict, param_dtype) -> np.dtype:
    """The dtype leaf `path` of `params` (now `dtype`) takes placed for a policy's param dtype
    (runtime/placement.py casts, runtime/memory.py counts): quantisation scales and integer
    leaves stay as they are (spec §1.1: scales are always float32), a packed (inference)
    model's float tables follow `table_dtype`, other float leaves take param_dtype."""
    dtype = np.dtype(dtype)
    if getattr(path[-1], "key", None) == "scale" or not jnp.issubdtype(dtype, jnp.floating):
        return dtype
    if (len(path) == 1 and getattr(path[0], "key", None) in TABLES
            and is_packed(params["layers"]["mlp"]["down_proj"])):
        return table_dtype(dtype, param_dtype)
    return np.dtype(param_dtype)


def lm_head_format(lm_head: str, cfg: ModelConfig, platform: str | None = None) -> str:
    """The one rule for the LM head's format: "int8" (quantize_lm_head) or "float".

    Args:
      lm_head: a policy's lm_head: "float", "int8", or "auto" = int8 on CPU (the head's bytes
        dominate a CPU decode step once the linears are ternary) and float elsewhere.
      cfg: the model config; a plain float Llama (cfg.quantized False) always keeps a float head.
      platform: where the model runs ("cpu", "gpu", ...); default JAX's default backend.
    """
    if lm_head == "auto":
        lm_head = "int8" if (platform or jax.default_backend()) == "cpu" else "float"
    return "int8" if lm_head == "int8" and cfg.quantized else "float"


def quantize_lm_head(params: dict, cfg: ModelConfig) -> dict:
    """Replace the LM head (the embedding, when tied) by an int8 per-row-scaled copy.

    The LM head reads V·D weights per token and dominates decode time once the linears are
    ternary (jax-notes §5: 40 ms int8 vs 83 ms f32 for 2B4T's head on this CPU). Each row v
    becomes q8[v] = round(127·W[v]/max|W[v]|) with scale[v] = max|W[v]|/127; `model.unembed` then
    runs an int8 x int8 -> int32 dot on per-token int8 activations, and `model.embed` dequantises
    the gathered rows of a tied table. Error: at most half an int8 step per weight and per
    activation (logit cosine > 0.9999 against float on the models tested).

    Returns:
      params with "embed_tokens" (tied) or "lm_head" (untied) = {"q8": int8 [V, D], "scale": f32 [V]}.
    """
    key = "embed_tokens" if cfg.tie_word_embeddings else "lm_head"
    w = params[key]
    if isinstance(w, dict):
        return params
    out = dict(params)
    out[key] = jax.jit(row_int8)(w)
    return out


def count_params(params: dict) -> int:
    """Number of logical weights (a packed leaf counts its O·I ternary weights)."""
    total = 0
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: is_packed(x) or _is_q8(x)):
        if is_packed(leaf):
            total += int(np.prod(leaf["packed"].shape)) * 4
        elif _is_q8(leaf):
            total += int(np.prod(leaf["q8"].shape))
        else:
            total += int(np.prod(leaf.shape))
    return total


def _is_q8(x) -> bool:
    return isinstance(x, dict) and "q8" in x


def layer(params: dict, i: int) -> dict:
    """The params of layer i (un-stacked view, for notebooks and tests)."""
    return jax.tree.map(lambda a: a[i], params["layers"])
