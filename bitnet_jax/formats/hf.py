"""Hugging Face checkpoints <-> params.

Reads a local HF directory (config.json + one or more *.safetensors) into the params pytree of
model.py. Every published BitNet weight convention is handled as data (bitnet-spec §0, §1.3, §6):

  packed uint8 [O/4, I] + weight_scale   kept packed; σ = weight_scale if linear_class is
                                         "autobitlinear" (2B4T), else σ = 1 / weight_scale
                                         (default "bitlinear": Falcon3, Llama3-8B-1.58)
  latent float (bf16 2B4T, fp16 1bitLLM) absmean-ternarised at load: t, σ = γ
  float Llama (no quantization)          kept as float

1bitLLM names its sub-norms `inner_attn_ln` / `ffn_layernorm`; they map to our HF-2B4T names.
Unknown, missing or mis-shaped tensors raise a CheckpointError naming the tensor. Pickled
checkpoints (.bin/.pt) are refused: we never unpickle.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.config import ModelConfig, load_config
from bitnet_jax.errors import CheckpointError
from bitnet_jax.model.params import (BITLINEAR_PATHS, TABLES, lm_head_format, linear_shapes,
                                     param_shapes, table_dtype)
from bitnet_jax.model.policy import Policy, get_policy
from bitnet_jax.formats.safetensors import read_safetensors, write_safetensors
from bitnet_jax.quant import (is_packed, pack_ternary_np, row_int8_np, ternarize_np,
                              unpack_ternary_np)

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF per-layer suffix -> (module, name) in params["layers"]; None module = top of the layer.
_LAYER_KEYS = {
    "input_layernorm.weight": (None, "input_layernorm"),
    "post_attention_layernorm.weight": (None, "post_attention_layernorm"),
    "self_attn.attn_sub_norm.weight": ("self_attn", "attn_sub_norm"),
    "self_attn.inner_attn_ln.weight": ("self_attn", "attn_sub_norm"),  # 1bitLLM name
    "mlp.ffn_sub_norm.weight": ("mlp", "ffn_sub_norm"),
    "mlp.ffn_layernorm.weight": ("mlp", "ffn_sub_norm"),  # 1bitLLM name
}
for _mod, _name in BITLINEAR_PATHS:
    _LAYER_KEYS[f"{_mod}.{_name}.weight"] = (_mod, _name)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _progress(total: int, desc: str):
    """A tqdm bar on stderr for big checkpoints, or a no-op."""
    if total < 200 * 1024 * 1024:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def _find_weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise CheckpointError(
            f"{path} holds only pickled weights ({pickled[0]}); bitnet_jax never unpickles: "
            "convert them to safetensors first (e.g. transformers' save_pretrained(..., "
            "safe_serialization=True))."
        )
    raise CheckpointError(f"{path} has config.json but no *.safetensors weight files.")


def read_config(path: Path) -> ModelConfig:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path} has no config.json; point to a Hugging Face model folder.")
    return load_config(cfg_path)


def _linear_leaf(name: str, w: np.ndarray, scale: np.ndarray | None, shape: tuple[int, int],
                 cfg: ModelConfig, packed: bool):
    """Convert one HF projection to (packed uint8 [O/4, I], σ) or a latent float array."""
    o, i = shape
    if w.dtype == np.uint8:
        if tuple(w.shape) != (o // 4, i):
            raise CheckpointError(
                f"tensor {name} has packed shape {tuple(w.shape)}, expected {(o // 4, i)}."
            )
        if scale is None:
            raise CheckpointError(f"tensor {name} is packed but {name}_scale is missing.")
        if (w & (w >> np.uint8(1)) & np.uint8(0x55)).any():
            # Code 3 (bits 11) is no ternary value; the kernels assume codes 0-2 (bitlinear.py).
            raise CheckpointError(f"tensor {name} holds the 2-bit code 3, which is not a ternary "
                                  "weight; the file is corrupt or not a BitNet packed checkpoint.")
        s = float(np.asarray(scale, np.float32).reshape(-1)[0])
        if not np.isfinite(s) or s == 0:
            raise CheckpointError(f"tensor {name}_scale={s} is not a usable scale.")
        sigma = s if cfg.linear_class == "autobitlinear" else 1.0 / s
        if packed:
            return np.ascontiguousarray(w), np.float32(sigma)
        return unpack_ternary_np(w).astype(np.float32) * np.float32(sigma)
    if tuple(w.shape) != (o, i):
        raise CheckpointError(f"tensor {name} has shape {tuple(w.shape)}, expected {(o, i)}.")
    if not cfg.quantized or not packed:
        return w
    t, gamma = ternarize_np(w)
    return pack_ternary_np(t), gamma


def _int8_rows(table: np.ndarray, chunk: int = 4096) -> dict:
    """int8 per-row copy {"q8", "scale"} of a float table, converted in row chunks."""
    q8 = np.empty(table.shape, np.int8)
    scale = np.empty(table.shape[0], np.float32)
    for r0 in range(0, table.shape[0], chunk):
        q8[r0:r0 + chunk], scale[r0:r0 + chunk] = row_int8_np(table[r0:r0 + chunk])
    return {"q8": jnp.asarray(q8), "scale": jnp.asarray(scale)}


def load_hf(path: str | Path, policy: Policy | str | None = None, packed: bool = True):
    """Load a local HF checkpoint directory.

    Args:
      path: folder with config.json and *.safetensors.
      policy: precision policy (float leaves are cast to policy.param_dtype).
      packed: True (inference) packs BitLinear weights; False keeps latent floats (QAT).

    Returns:
      (config, params).
    """
    path = Path(path)
    policy = get_policy(policy)
    cfg = read_config(path)
    tensors: dict[str, np.ndarray] = {}
    for f in _find_weight_files(path):
        for name, arr in read_safetensors(f).items():
            tensors[name] = arr
    shapes = param_shapes(cfg)
    lin_shapes = linear_shapes(cfg)
    L = cfg.num_hidden_layers
    per_layer: list[dict] = [dict() for _ in range(L)]
    scales: list[dict] = [dict() for _ in range(L)]
    top: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        m = _LAYER_RE.match(name)
        if m:
            i, suffix = int(m.group(1)), m.group(2)
            if i >= L:
                raise CheckpointError(f"tensor {name} belongs to layer {i} but the config has {L}.")
            if suffix.endswith(_IGNORED_SUFFIXES):
                continue
            if suffix.endswith(".weight_scale"):
                scales[i][suffix[: -len("_scale")]] = arr
                continue
            if suffix not in _LAYER_KEYS:
                raise CheckpointError(f"tensor {name} is not part of a {cfg.architecture} model.")
            per_layer[i][_LAYER_KEYS[suffix]] = (name, arr)
        elif name == "model.embed_tokens.weight":
            top["embed_tokens"] = arr
        elif name == "model.norm.weight":
            top["norm"] = arr
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                top["lm_head"] = arr
        else:
            raise CheckpointError(f"tensor {name} is not part of a {cfg.architecture} model.")

    total = sum(a.nbytes for a in tensors.values())
    bar = _progress(total, f"loading {path.name}")
    params: dict = {"layers": {"self_attn": {}, "mlp": {}}}
    for key in ("embed_tokens", "norm", "lm_head"):
        if key not in shapes:
            continue
        hf_name = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight",
                   "lm_head": "lm_head.weight"}[key]
        if key not in top:
            raise CheckpointError(f"tensor {hf_name} is missing from the checkpoint.")
        if tuple(top[key].shape) != shapes[key]:
            raise CheckpointError(
                f"tensor {hf_name} has shape {tuple(top[key].shape)}, expected {shapes[key]}."
            )
        head = "embed_tokens" if cfg.tie_word_embeddings else "lm_head"
        if key == head and lm_head_format(policy.lm_head, cfg) == "int8":
            params[key] = _int8_rows(top[key])
        else:
            arr = np.asarray(top[key])
            keep = packed and key in TABLES  # inference: a 16-bit table stays so
            params[key] = jnp.asarray(arr.astype(table_dtype(arr.dtype, policy.param) if keep
                                                 else policy.param))
        if bar:
            bar.update(top[key].nbytes)

    wanted = {(mod, name): s for (mod, name), s in lin_shapes.items()}
    for mod, name in [(None, "input_layernorm"), (None, "post_attention_layernorm")] + (
        [("self_attn", "attn_sub_norm"), ("mlp", "ffn_sub_norm")] if cfg.use_sub_norms else []
    ) + list(wanted):
        leaves = []
        for i in range(L):
            if (mod, name) not in per_layer[i]:
                hf = f"model.layers.{i}.{mod + '.' if mod else ''}{name}.weight"
                raise CheckpointError(f"tensor {hf} is missing from the checkpoint.")
            hf_name, arr = per_layer[i].pop((mod, name))
            if (mod, name) in wanted:
                leaves.append(_linear_leaf(hf_name, arr, scales[i].get(f"{mod}.{name}.weight"),
                                           wanted[(mod, name)], cfg, packed))
            else:
                expect = shapes["layers"][mod][name][1:] if mod else shapes["layers"][name][1:]
                if tuple(arr.shape) != expect:
                    raise CheckpointError(
                        f"tensor {hf_name} has shape {tuple(arr.shape)}, expected {expect}."
                    )
                leaves.append(arr)
            if bar:
                bar.update(arr.nbytes)
        if isinstance(leaves[0], tuple):
            leaf = {"packed": jnp.asarray(np.stack([p for p, _ in leaves])),
                    "scale": jnp.asarray(np.array([s for _, s in leaves], np.float32))}
        else:
            leaf = jnp.asarray(np.stack([np.asarray(a).astype(policy.param) for a in leaves]))
        if mod is None:
            params["layers"][name] = leaf
        else:
            params["layers"][mod][name] = leaf
    for i in range(L):
        stray = set(scales[i]) - {f"{m}.{n}.weight" for m, n in BITLINEAR_PATHS}
        if stray:
            raise CheckpointError(
                f"tensor model.layers.{i}.{sorted(stray)[0]}_scale is not part of a "
                f"{cfg.architecture} model.")
        if per_layer[i]:
            (mod, name), (hf_name, _) = next(iter(per_layer[i].items()))
            raise CheckpointError(f"tensor {hf_name} is not part of a {cfg.architecture} model.")
    if bar:
        bar.close()
    return cfg, params


def save_hf(path: str | Path, cfg: ModelConfig, params: dict, packed: bool = True) -> None:
    """Write params as an HF directory (config.json + model.safetensors).

    Packed BitLinear leaves are written in the offline packed format with
    linear_class "autobitlinear" (weight_scale multiplies); latent leaves as floats.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"])}
    layers = params["layers"]
    any_packed = any(is_packed(layers[m][n]) for m, n in BITLINEAR_PATHS)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = np.asarray(layers["input_layernorm"][i])
        tensors[pre + "post_attention_layernorm.weight"] = np.asarray(
            layers["post_attention_layernorm"][i])
        if cfg.use_sub_norms:
            tensors[pre + "self_attn.attn_sub_norm.weight"] = np.asarray(
                layers["self_attn"]["attn_sub_norm"][i])
            tensors[pre + "mlp.ffn_sub_norm.weight"] = np.asarray(layers["mlp"]["ffn_sub_norm"][i])
        for mod, name in BITLINEAR_PATHS:
            w = layers[mod][name]
            if is_packed(w):
                tensors[pre + f"{mod}.{name}.weight"] = np.asarray(w["packed"][i])
                tensors[pre + f"{mod}.{name}.weight_scale"] = np.asarray(
                    w["scale"][i], np.float32).reshape(1)
            else:
                tensors[pre + f"{mod}.{name}.weight"] = np.asarray(w[i])
    tensors["model.norm.weight"] = np.asarray(params["norm"])
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = np.asarray(params["lm_head"])
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    hf = cfg.to_hf()
    if cfg.quantized:
        hf["quantization_config"] = {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear" if any_packed else cfg.linear_class,
            "quantization_mode": "offline" if any_packed else "online",
        }
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
