"""GGUF architectures <-> ModelConfig, tensor names, and llama.cpp's Q/K row permutation.

Which graph each architecture string means (bitnet-spec §2.1, §2.2.1, §6):

  bitnet         llama.cpp's 1bitLLM graph: SiLU-gated FFN, sub-norms, tied embeddings, NEOX
                 RoPE on unpermuted rows. `{arch}.hidden_activation` overrides the activation
                 (newer upstream files may say "relu2").
  bitnet-b1.58,  bitnet.cpp's 2B4T graph (build_bitnet_158): relu²-gated FFN, sub-norms,
  bitnet-25      optional untied `output`, NEOX RoPE on unpermuted rows.
  llama          ternary (TQ*/I2_S weights: Falcon3-1.58bit, Llama3-8B-1.58) or plain float
                 Llama; no sub-norms. Converters permute Q/K rows for llama.cpp's interleaved
                 (NORM) RoPE; we undo it so our rotate-half RoPE applies.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bitnet_jax.model.config import ModelConfig
from bitnet_jax.errors import ConfigError, GGUFError

# arch -> (HF architecture, default activation, sub-norms, Q/K rows permuted by the converter)
ARCHS = {
    "bitnet": ("BitnetForCausalLM", "silu", True, False),
    "bitnet-25": ("BitNetForCausalLM", "relu2", True, False),
    "bitnet-b1.58": ("BitNetForCausalLM", "relu2", True, False),
    "llama": ("LlamaForCausalLM", "silu", False, True),
}
TERNARY_TYPES = ("TQ1_0", "TQ2_0", "I2_S")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "swiglu": "silu", "relu2": "relu2",
                "relu_sqr": "relu2", "relu_squared": "relu2", "squared_relu": "relu2"}

# params path -> GGUF per-block tensor name (blk.N.<name>.weight)
LINEAR_NAMES = {
    ("self_attn", "q_proj"): "attn_q", ("self_attn", "k_proj"): "attn_k",
    ("self_attn", "v_proj"): "attn_v", ("self_attn", "o_proj"): "attn_output",
    ("mlp", "gate_proj"): "ffn_gate", ("mlp", "up_proj"): "ffn_up",
    ("mlp", "down_proj"): "ffn_down",
}
NORM_NAMES = {
    (None, "input_layernorm"): "attn_norm", (None, "post_attention_layernorm"): "ffn_norm",
    ("self_attn", "attn_sub_norm"): "attn_sub_norm", ("mlp", "ffn_sub_norm"): "ffn_sub_norm",
}
SUB_NORMS = (("self_attn", "attn_sub_norm"), ("mlp", "ffn_sub_norm"))


def block_tensor(i: int, name: str, suffix: str = "weight") -> str:
    return f"blk.{i}.{name}.{suffix}"


def llama_permutation(rows: int, n_heads: int) -> np.ndarray:
    """Row order llama.cpp's converter writes Q/K in: gguf_W = hf_W[perm].

    Per head of H rows, HF's rotate-half pairs (i, i + H/2) become adjacent rows (2i, 2i+1)
    (convert_hf_to_gguf.py `LlamaModel.permute`: reshape (heads, 2, H/2), swap the last two).
    K uses the KV head count.
    """
    h = rows // n_heads
    idx = np.arange(rows).reshape(n_heads, 2, h // 2).swapaxes(1, 2)
    return idx.reshape(rows)


def inverse_llama_permutation(rows: int, n_heads: int) -> np.ndarray:
    """hf_W = gguf_W[inv]: which file row holds each of our rows."""
    return np.argsort(llama_permutation(rows, n_heads))


def _value(meta: Mapping[str, Any], key: str, kind: str, path, default=None, required=False):
    value = meta.get(key, default)
    if value is None:
        if required:
            raise GGUFError(f"{path} lacks the metadata key {key!r}; re-convert the model.")
        return None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str)}[kind]
    if not ok:
        raise GGUFError(f"{path}: metadata key {key!r} holds {value!r}, expected a {kind}.")
    return value


def _per_layer(meta, key, path, required=False, default=None):
    """A count that llama.cpp allows as one value or a per-layer array of equal values."""
    value = meta.get(key)
    if isinstance(value, list):
        if not value or len(set(value)) != 1 or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise GGUFError(f"{path}: metadata key {key!r} varies per layer ({value[:4]}...); "
                            "bitnet_jax needs one value for all layers.")
        return value[0]
    return _value(meta, key, "int", path, default, required)


def config_from_gguf(meta: Mapping[str, Any], tensor_types: Mapping[str, str],
                     tensor_shapes: Mapping[str, tuple[int, ...]], path) -> tuple[ModelConfig, str]:
    """Build the ModelConfig a GGUF describes.

    Args:
      meta: the file's metadata (plain values).
      tensor_types: tensor name -> type name ("F16", "TQ2_0", ...).
      tensor_shapes: tensor name -> numpy-order shape.
      path: the file (for messages).

    Returns:
      (config, architecture string).
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path} has architecture {arch!r}; bitnet_jax loads GGUF architectures "
                        f"{', '.join(ARCHS)}.")
    hf_arch, act, sub_norms, _ = ARCHS[arch]
    p = f"{arch}."
    act_name = _value(meta, p + "hidden_activation", "str", path)
    if act_name is not None:
        if act_name.lower() not in _ACTIVATIONS:
            raise GGUFError(f"{path}: {p}hidden_activation={act_name!r} is not supported; "
                            "bitnet_jax runs silu and relu2 FFNs.")
        act = _ACTIVATIONS[act_name.lower()]

    if "token_embd.weight" not in tensor_shapes:
        raise GGUFError(f"{path} lacks the tensor 'token_embd.weight'; re-convert the model.")
    emb_shape = tensor_shapes["token_embd.weight"]
    if len(emb_shape) != 2:
        raise GGUFError(f"{path}: token_embd.weight has shape {emb_shape}, expected 2-D.")
    vocab, hidden = emb_shape
    d = _value(meta, p + "embedding_length", "int", path, required=True)
    if d != hidden:
        raise GGUFError(f"{path}: {p}embedding_length={d} disagrees with token_embd.weight's "
                        f"width {hidden}.")
    v = _value(meta, p + "vocab_size", "int", path)
    if v is not None and v != vocab:
        raise GGUFError(f"{path}: {p}vocab_size={v} disagrees with token_embd.weight's "
                        f"{vocab} rows.")
    heads = _per_layer(meta, p + "attention.head_count", path, required=True)
    kv_heads = _per_layer(meta, p + "attention.head_count_kv", path, default=heads)
    head_dim = _value(meta, p + "attention.key_length", "int", path)
    v_dim = _value(meta, p + "attention.value_length", "int", path)
    if head_dim is not None and v_dim is not None and head_dim != v_dim:
        raise GGUFError(f"{path}: key_length {head_dim} != value_length {v_dim} is not "
                        "supported.")
    if head_dim is None and heads:
        head_dim = v_dim if v_dim is not None else (d // heads if d % heads == 0 else None)
    rot = _value(meta, p + "rope.dimension_count", "int", path)
    if rot is not None and head_dim is not None and rot != head_dim:
        raise GGUFError(f"{path}: {p}rope.dimension_count={rot} is a partial rotary embedding "
                        f"(head_dim {head_dim}); bitnet_jax supports full RoPE only.")
    scaling = _value(meta, p + "rope.scaling.type", "str", path)
    factor = _value(meta, p + "rope.scaling.factor", "float", path)
    linear = _value(meta, p + "rope.scale_linear", "float", path)
    if (scaling not in (None, "none", "linear") or factor not in (None, 0.0, 1.0)
            or linear not in (None, 1.0)):
        raise GGUFError(f"{path}: RoPE scaling ({scaling}, factor {factor or linear}) is not "
                        "supported; bitnet_jax runs unscaled RoPE.")

    linear_types = {t for name, t in tensor_types.items()
                    if name.startswith("blk.") and any(f".{n}.weight" in name
                                                       for n in LINEAR_NAMES.values())}
    if arch == "llama":
        quant_method = "bitnet" if linear_types & set(TERNARY_TYPES) else None
    else:
        quant_method = "bitnet"
    eos = _value(meta, "tokenizer.ggml.eos_token_id", "int", path)
    eot = _value(meta, "tokenizer.ggml.eot_token_id", "int", path)
    eos_ids = tuple(dict.fromkeys(x for x in (eos, eot) if x is not None))
    try:
        cfg = ModelConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=_per_layer(meta, p + "feed_forward_length", path, required=True),
            num_hidden_layers=_value(meta, p + "block_count", "int", path, required=True),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=_value(meta, p + "context_length", "int", path,
                                           required=True),
            rms_norm_eps=float(_value(meta, p + "attention.layer_norm_rms_epsilon", "float",
                                      path, required=True)),
            rope_theta=float(_value(meta, p + "rope.freq_base", "float", path, 10000.0)),
            hidden_act=act,
            tie_word_embeddings="output.weight" not in tensor_shapes,
            bos_token_id=_value(meta, "tokenizer.ggml.bos_token_id", "int", path),
            eos_token_id=(eos_ids[0] if len(eos_ids) == 1 else eos_ids) if eos_ids else None,
            pad_token_id=_value(meta, "tokenizer.ggml.padding_token_id", "int", path),
            model_type="bitnet" if arch != "llama" else "llama",
            architecture=hf_arch,
            use_sub_norms=sub_norms,
            quant_method=quant_method,
            # Our packed scale σ multiplies (W = σ·t), which is HF's autobitlinear convention.
            linear_class="autobitlinear",
            quantization_mode="offline",
        )
    except ConfigError as exc:
        raise GGUFError(f"{path}: the metadata describes an invalid model ({exc})") from None
    return cfg, arch


def gguf_arch_for(cfg: ModelConfig) -> str:
    """The architecture string our writer uses for a config (spec §2.1, §2.2.1)."""
    if not cfg.use_sub_norms:
        return "llama"
    return "bitnet-b1.58" if cfg.hidden_act == "relu2" else "bitnet"


def metadata_for_config(cfg: ModelConfig, arch: str, name: str) -> dict[str, Any]:
    """The model metadata keys (not the tokenizer's) describing `cfg` under `arch`."""
    p = f"{arch}."
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": name,
        p + "context_length": cfg.max_position_embeddings,
        p + "embedding_length": cfg.hidden_size,
        p + "block_count": cfg.num_hidden_layers,
        p + "feed_forward_length": cfg.intermediate_size,
        p + "attention.head_count": cfg.num_attention_heads,
        p + "attention.head_count_kv": cfg.num_key_value_heads,
        p + "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        p + "rope.freq_base": float(cfg.rope_theta),
        p + "rope.dimension_count": cfg.head_dim,
        p + "vocab_size": cfg.vocab_size,
    }
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        meta[p + "attention.key_length"] = cfg.head_dim
        meta[p + "attention.value_length"] = cfg.head_dim
    if arch != "llama":
        # llama.cpp ignores keys it does not ask for, and newer upstream `bitnet` graphs read
        # this one (spec §2.1); it makes the activation explicit for every reader.
        meta[p + "hidden_activation"] = cfg.hidden_act
    return meta
