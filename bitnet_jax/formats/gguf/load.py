"""`load_gguf`: a GGUF file -> bitnet_jax.formats.base.Model (the same Model the HF path returns).

Weights are converted one tensor at a time from per-tensor memory maps (reader.py):

  TQ1_0 / TQ2_0 / I2_S   2-bit or base-3 codes -> our packed leaf {"packed": uint8 [L, O/4, I],
                         "scale": f32 [L]} by integer operations only, written straight into the
                         stacked [L, ...] buffer (quants.py). TQ blocks carry an fp16 scale d
                         each; a BitNet conversion has one d for every nonzero block (= γ in
                         fp16), which becomes σ. Blocks with differing d (not a BitNet file) make
                         that projection a latent float weight, with one warning.
  F32 / F16 / BF16       linear weights of a ternary model are ternarised: t·γ floats (what
                         llama.cpp's converter writes) give σ = γ exactly; other floats are
                         latent weights and get BitNet's absmean rule. Float Llama keeps floats.
  Q8_0 and other quants  dequantised (token_embd / output only in practice).

Optional 1-element `blk.N.<proj>.scale` tensors (llama.cpp's bitnet graph multiplies the
matmul output by them, spec §2.1) are folded into σ. For `llama` files the Q/K rows are
un-permuted (arch.py). Buffers are 64-byte aligned and handed to JAX with `may_alias`, so on CPU
the params alias them (no second copy); peak memory stays near the size of the final params.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from bitnet_jax.errors import GGUFError
from bitnet_jax.formats.base import Model
from bitnet_jax.formats.gguf import quants
from bitnet_jax.formats.gguf.arch import (
    ARCHS, LINEAR_NAMES, NORM_NAMES, SUB_NORMS, TERNARY_TYPES, block_tensor, config_from_gguf,
    inverse_llama_permutation)
from bitnet_jax.formats.gguf.reader import GGUFFile, TensorInfo, read_gguf
from bitnet_jax.formats.gguf.tensors import (CHUNK_BYTES, DEQUANT_TYPES, FLOAT_TYPES,
                                             aligned_empty, decode_ternary,
                                             dequantize_ternary, read_float)
from bitnet_jax.model.params import lm_head_format, linear_shapes, table_dtype
from bitnet_jax.quant import row_int8_np
from bitnet_jax.model.policy import Policy, get_policy
from bitnet_jax.tokenizer import from_gguf_metadata

def _to_device(arr: np.ndarray) -> jax.Array:
    # may_alias: on CPU the jax.Array shares the (aligned) numpy buffer instead of copying it.
    return jax.device_put(arr, may_alias=True)


def _np_dtype(policy: Policy):
    return ml_dtypes.bfloat16 if policy.param_dtype == "bfloat16" else np.float32


_PROGRESS_BYTES = 200 << 20


class _Progress:
    """tqdm on stderr for big files (> 200 MB), else a no-op."""

    def __init__(self, total: int, desc: str):
        self.bar = None
        if total > _PROGRESS_BYTES:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                            leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Loader:
    """Per-file state: the parsed header, config, and the once-only fallback warning."""

    def __init__(self, g: GGUFFile, cfg, arch: str, policy: Policy, packed: bool):
        self.g, self.cfg, self.arch, self.policy, self.packed = g, cfg, arch, policy, packed
        self.dtype = _np_dtype(policy)
        self.fallbacks: list[str] = []
        self.used: set[str] = set()
        self.bar = _Progress(sum(t.nbytes for t in g.tensors.values()), f"loading {g.path.name}")

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        info = self.g.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.g.path} lacks the tensor {name!r}, which a "
                            f"{self.arch} model needs; re-convert the model.")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise GGUFError(f"{self.g.path}: tensor {name!r} has shape {info.shape}, expected "
                            f"{tuple(shape)} from the metadata.")
        self.used.add(name)
        self.bar.update(info.nbytes)
        return info

    def check_float(self, info: TensorInfo) -> None:
        if info.type_name not in DEQUANT_TYPES:
            raise GGUFError(f"{self.g.path}: tensor {info.name!r} has type {info.type_name}, "
                            "which bitnet_jax cannot read there; re-convert it as F16 or F32.")

    def float_tensor(self, name: str, shape: tuple[int, ...], table: bool = False) -> jax.Array:
        """A float tensor in the policy's param dtype; a `table` of a packed model read for
        inference keeps a 16-bit float type (params.table_dtype)."""
        info = self.tensor(name, shape)
        self.check_float(info)
        dtype = self.dtype
        if table and self.packed:
            # F64 and the block-quantised types are decoded to float32
            dtype = table_dtype(quants.FLOAT_DTYPES.get(info.type_name, np.float32), self.dtype)
        return _to_device(read_float(self.g, info, dtype, aligned_empty(info.shape, dtype)))

    def int8_tensor(self, name: str, shape: tuple[int, ...]) -> dict:
        """An int8 per-row copy {"q8", "scale"} (params.quantize_lm_head), read in row chunks."""
        info = self.tensor(name, shape)
        self.check_float(info)
        rows, cols = shape
        q8 = aligned_empty((rows, cols), np.int8)
        scale = np.empty((rows,), np.float32)
        step = max(1, CHUNK_BYTES // (4 * cols))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            sub = dataclasses.replace(info, shape=(r1 - r0, cols),
                                      offset=info.offset + r0 * (info.nbytes // rows),
                                      nbytes=(r1 - r0) * (info.nbytes // rows))
            q8[r0:r1], scale[r0:r1] = row_int8_np(read_float(self.g, sub, np.float32))
        return {"q8": _to_device(q8), "scale": _to_device(scale)}

    def stacked_norm(self, gname: str, width: int) -> jax.Array:
        out = aligned_empty((self.cfg.num_hidden_layers, width), self.dtype)
        for layer in range(self.cfg.num_hidden_layers):
            info = self.tensor(block_tensor(layer, gname), (width,))
            self.check_float(info)
            read_float(self.g, info, self.dtype, out[layer])
        return _to_device(out)

    def extra_scale(self, layer: int, gname: str) -> float:
        info = self.g.tensors.get(block_tensor(layer, gname, "scale"))
        if info is None:
            return 1.0
        self.used.add(info.name)
        if info.n_elements != 1 or info.type_name not in FLOAT_TYPES:
            raise GGUFError(f"{self.g.path}: tensor {info.name!r} must be one float, got "
                            f"{info.type_name} {info.shape}.")
        value = float(read_float(self.g, info).reshape(-1)[0])
        if not np.isfinite(value):
            raise GGUFError(f"{self.g.path}: tensor {info.name!r} is not finite.")
        return value

    def permutation(self, path: tuple[str, str], o: int) -> np.ndarray | None:
        if not ARCHS[self.arch][3] or path[1] not in ("q_proj", "k_proj"):
            return None
        heads = (self.cfg.num_attention_heads if path[1] == "q_proj"
                 else self.cfg.num_key_value_heads)
        return inverse_llama_permutation(o, heads)

    def linear(self, path: tuple[str, str]):
        """One projection kind, all layers: a packed leaf or a latent float [L, O, I]."""
        cfg, g = self.cfg, self.g
        n_layers = cfg.num_hidden_layers
        o, i = linear_shapes(cfg)[path]
        gname = LINEAR_NAMES[path]
        perm = self.permutation(path, o)
        infos = [self.tensor(block_tensor(layer, gname), (o, i)) for layer in range(n_layers)]
        for info in infos:
            if info.type_name not in TERNARY_TYPES and not self._is_float(info):
                raise GGUFError(f"{g.path}: tensor {info.name!r} has type {info.type_name}; "
                                "linear weights must be TQ1_0, TQ2_0, I2_S, F32, F16 or BF16.")
        extra = [self.extra_scale(layer, gname) for layer in range(n_layers)]
        if not cfg.quantized:
            out = aligned_empty((n_layers, o, i), self.dtype)
            for layer, info in enumerate(infos):
                w = read_float(g, info)
                w = w[perm] if perm is not None else w
                out[layer] = w * np.float32(extra[layer]) if extra[layer] != 1.0 else w
            return _to_device(out)

        packed = aligned_empty((n_layers, o // 4, i), np.uint8)
        scales = np.empty(n_layers, np.float32)
        floats: dict[int, np.ndarray] = {}  # layers whose file value is not t·σ
        for layer, info in enumerate(infos):
            if info.type_name in TERNARY_TYPES:
                sigma = decode_ternary(g, info, o, i, perm, packed[layer])
                if sigma is None:
                    w = dequantize_ternary(g, info, o, i)
                    floats[layer] = w[perm] if perm is not None else w
                    self.fallbacks.append(info.name)
                    sigma = 1.0
            else:
                w = read_float(g, info)
                w = w[perm] if perm is not None else w
                codes, sigma, _ = quants.ternarize_float(w)
                quants.pack_codes(codes, out=packed[layer])
                if not self.packed:
                    floats[layer] = w
            scales[layer] = sigma * extra[layer]
            if layer in floats:
                floats[layer] = floats[layer] * np.float32(extra[layer])
        if self.packed and not any(info.name in self.fallbacks for info in infos):
            return {"packed": _to_device(packed), "scale": _to_device(scales)}
        # Latent float leaf for the whole kind (stacked leaves must share one form): the file's
        # own float values, or t·σ for the layers stored ternary.
        out = aligned_empty((n_layers, o, i), self.dtype)
        for layer in range(n_layers):
            if layer in floats:
                out[layer] = floats[layer]
            else:
                t = quants.codes_to_ternary(quants.unpack_codes(packed[layer]))
                out[layer] = t.astype(np.float32) * scales[layer]
        return _to_device(out)

    @staticmethod
    def _is_float(info: TensorInfo) -> bool:
        return info.type_name in FLOAT_TYPES

    def params(self) -> dict:
        cfg = self.cfg
        d, v = cfg.hidden_size, cfg.vocab_size
        params: dict[str, Any] = {"layers": {"self_attn": {}, "mlp": {}}}
        layers = params["layers"]
        for path in LINEAR_NAMES:
            layers[path[0]][path[1]] = self.linear(path)
        widths = {"input_layernorm": d, "post_attention_layernorm": d, "attn_sub_norm": d,
                  "ffn_sub_norm": cfg.intermediate_size}
        for (mod, name), gname in NORM_NAMES.items():
            if (mod, name) in SUB_NORMS and not cfg.use_sub_norms:
                continue
            leaf = self.stacked_norm(gname, widths[name])
            if mod is None:
                layers[name] = leaf
            else:
                layers[mod][name] = leaf
        int8_head = lm_head_format(self.policy.lm_head, cfg) == "int8"
        head = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
        if int8_head and head == "token_embd.weight":
            params["embed_tokens"] = self.int8_tensor("token_embd.weight", (v, d))
        else:
            params["embed_tokens"] = self.float_tensor("token_embd.weight", (v, d), table=True)
        params["norm"] = self.float_tensor("output_norm.weight", (d,))
        if not cfg.tie_word_embeddings:
            params["lm_head"] = (self.int8_tensor("output.weight", (v, d)) if int8_head else
                                 self.float_tensor("output.weight", (v, d), table=True))
        self._check_unused()
        self.bar.close()
        if self.fallbacks:
            warnings.warn(
                f"{self.g.path}: {len(self.fallbacks)} ternary tensors (first "
                f"{self.fallbacks[0]!r}) have different scales per 256-value block, so this is "
                "not a BitNet conversion; they were loaded as latent float weights, which the "
                "forward pass re-ternarises per matrix.", stacklevel=3)
        return params

    def _check_unused(self) -> None:
        for name, info in self.g.tensors.items():
            if name in self.used:
                continue
            if name == "rope_freqs.weight":
                self.check_float(info)
                factors = read_float(self.g, info)
                if np.all(factors == 1.0):
                    continue
                raise GGUFError(f"{self.g.path} carries RoPE frequency factors "
                                "(rope_freqs.weight), which bitnet_jax does not support.")
            raise GGUFError(f"{self.g.path}: tensor {name!r} is not part of a {self.arch} model "
                            "that bitnet_jax can run (biases and extra tensors are unsupported).")


def load_gguf(path: str | Path, policy: Policy | str | None = None, packed: bool = True,
              tokenizer: bool = True):
    """Load a GGUF file as a bitnet_jax Model.

    Args:
      path: a .gguf file with architecture bitnet, bitnet-b1.58, bitnet-25 or llama.
      policy: precision policy or preset name; float params are stored in policy.param.
      packed: True keeps BitLinear weights packed; False gives latent float weights.
      tokenizer: attach a Tokenizer built from the tokenizer.* metadata (None if absent).

    Returns:
      bitnet_jax.formats.base.Model.
    """
    policy = get_policy(policy)
    g = read_gguf(path)
    cfg, arch = config_from_gguf(
        g.metadata, {n: t.type_name for n, t in g.tensors.items()},
        {n: t.shape for n, t in g.tensors.items()}, g.path)
    params = _Loader(g, cfg, arch, policy, packed).params()
    tok = tokenizer_from_metadata(g.metadata) if tokenizer else None
    return Model(cfg, params, tok, policy, str(path))


def tokenizer_from_metadata(meta: dict[str, Any]):
    """A bitnet_jax Tokenizer from GGUF metadata, or None if the file carries no vocabulary."""
    if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
        return None
    # The reader keeps bytes that are not UTF-8 as surrogate escapes (so inspect and convert can
    # copy them); a vocabulary needs real text, as llama.cpp assumes.
    for key, value in meta.items():
        if not key.startswith("tokenizer."):
            continue
        strings = value if isinstance(value, list) else [value]
        if strings and isinstance(strings[0], str):
            try:
                "".join(s for s in strings if isinstance(s, str)).encode("utf-8")
            except UnicodeEncodeError:
                index = next(i for i, s in enumerate(strings) if isinstance(s, str)
                             and not _is_utf8(s))
                where = f"{key}[{index}]" if isinstance(value, list) else key
                raise GGUFError(f"GGUF metadata {where} is not valid UTF-8 text; the file is "
                                "corrupt, so re-download or re-convert it.") from None

    return from_gguf_metadata(meta)


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
