"""Writing GGUF files (`bitnet-jax convert` is bitnet_jax/cli/convert.py).

We write the container ourselves instead of using `gguf.GGUFWriter`: its type enum lacks
bitnet.cpp's I2_S (id 36), and it keeps every tensor in memory until the end, while this writer
streams: each tensor is produced by a callback just before its bytes are written, so converting
or generating a large model holds one tensor at a time. The output is checked against
`gguf.GGUFReader` in the tests.

What `convert` writes (bitnet-spec §2.1, §2.2):

  architecture   `bitnet` (SiLU sub-norm models, the 1bitLLM graph), `bitnet-b1.58` (relu²
                 sub-norm models, the 2B4T graph), `llama` (no sub-norms; Q/K rows permuted the
                 way llama.cpp's converter does). `{arch}.hidden_activation` states the
                 activation (llama.cpp ignores keys it does not read).
  linear weights tq2_0 / tq1_0: d = σ (fp16) in every block; i2_s: bitnet.cpp's x86 layout with
                 the float32 σ in the tail; f16 / f32: t·σ. Rows not a multiple of 256 (TQ) or
                 128 (I2_S) fall back to F16 t·σ with a warning, as llama.cpp's converter does.
  token_embd, output  F16 (F32 with --type f32). Norms F32.
  general.file_type   TQ1_0 36, TQ2_0 37, I2_S 40 (bitnet.cpp), F16 1, F32 0.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import numpy as np

from bitnet_jax.errors import GGUFError
from bitnet_jax.formats.gguf import quants
from bitnet_jax.formats.gguf.arch import (
    LINEAR_NAMES, NORM_NAMES, SUB_NORMS, block_tensor, gguf_arch_for, llama_permutation,
    metadata_for_config)
from bitnet_jax.formats.gguf.reader import (
    ARRAY, BOOL, DEFAULT_ALIGNMENT, FLOAT32, GGUF_MAGIC, INT32, INT64, SCALAR_DTYPES,
    SCALAR_FORMATS, STRING, TYPE_IDS, UINT32, UINT64)
from bitnet_jax.model.params import linear_shapes
from bitnet_jax.quant import is_packed, ternarize_np
from bitnet_jax.tokenizer import to_gguf_metadata

QTYPES = ("tq2_0", "tq1_0", "i2_s", "f16", "f32")
FILE_TYPES = {"f32": 0, "f16": 1, "tq1_0": 36, "tq2_0": 37, "i2_s": 40}
_ROW_MULTIPLE = {"tq2_0": quants.QK, "tq1_0": quants.QK, "i2_s": quants.I2S_BLOCK}

# Value types llama.cpp's loader expects for the keys we write (it rejects a wrong type).
_KEY_TYPES = {
    "general.architecture": STRING, "general.name": STRING, "general.file_type": UINT32,
    "general.quantization_version": UINT32, "general.alignment": UINT32,
    "tokenizer.ggml.model": STRING, "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.tokens": (ARRAY, STRING), "tokenizer.ggml.merges": (ARRAY, STRING),
    "tokenizer.ggml.scores": (ARRAY, FLOAT32), "tokenizer.ggml.token_type": (ARRAY, INT32),
    "tokenizer.chat_template": STRING,
}
_UINT32_SUFFIXES = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                    "attention.head_count", "attention.head_count_kv", "attention.key_length",
                    "attention.value_length", "rope.dimension_count", "vocab_size",
                    "_token_id")
_FLOAT32_SUFFIXES = ("layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor")


@dataclasses.dataclass
class TensorEntry:
    """A tensor to write.

    Attributes:
      name: GGUF name.
      type_name: "F32", "F16", "TQ2_0", "TQ1_0", "I2_S", ...
      shape: numpy-order shape (outermost first); written reversed as ggml `ne`.
      nbytes: exact byte size of the data.
      produce: returns the data: an array whose raw bytes are the tensor (nbytes long), or an
        iterable of such arrays written one after another (to stream a large tensor).
    """

    name: str
    type_name: str
    shape: tuple[int, ...]
    nbytes: int
    produce: Callable[[], np.ndarray | Iterable[np.ndarray]]


# ------------------------------------------------------------------------------------------------
# Container


def value_type(key: str, value: Any) -> Any:
    """The GGUF value type to write `value` under `key` with (known keys first, then inferred)."""
    if key in _KEY_TYPES:
        return _KEY_TYPES[key]
    last = key.rsplit(".", 1)[-1]
    if isinstance(value, bool) or last.startswith("add_") or last == "remove_extra_whitespaces":
        return BOOL
    if isinstance(value, int) and key.endswith(_UINT32_SUFFIXES) and 0 <= value < 1 << 32:
        return UINT32
    if isinstance(value, (int, float)) and key.endswith(_FLOAT32_SUFFIXES):
        return FLOAT32
    return _infer(value)


def _infer(value: Any) -> Any:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 1 << 32:
            return UINT32
        if -(1 << 31) <= v < 0:
            return INT32
        return UINT64 if v >= 0 else INT64
    if isinstance(value, (float, np.floating)):
        return FLOAT32
    if isinstance(value, str):
        return STRING
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            return (ARRAY, INT32)
        if all(isinstance(v, str) for v in value):
            return (ARRAY, STRING)
        if all(isinstance(v, bool) for v in value):
            return (ARRAY, BOOL)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return (ARRAY, INT32 if all(-(1 << 31) <= int(v) < 1 << 31 for v in value)
                    else INT64)
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
               for v in value):
            return (ARRAY, FLOAT32)
        if all(isinstance(v, (list, tuple)) for v in value):
            return (ARRAY, _infer(value[0]))
    raise GGUFError(f"cannot store metadata value {str(value)[:60]!r} in GGUF; use a string, "
                    "number, bool or list of one of those.")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(vtype: Any, value: Any) -> bytes:
    if isinstance(vtype, tuple):
        etype = vtype[1]
        values = list(value)
        head = struct.pack("<IQ", etype if not isinstance(etype, tuple) else ARRAY, len(values))
        if isinstance(etype, tuple):
            return head + b"".join(_encode_value(etype, v) for v in values)
        if etype == STRING:
            return head + b"".join(_string(v) for v in values)
        arr = np.asarray(values, dtype=np.dtype(SCALAR_DTYPES[etype]))
        return head + arr.tobytes()
    if vtype == STRING:
        return struct.pack("<I", STRING) + _string(value)
    if vtype == BOOL:
        return struct.pack("<IB", BOOL, 1 if value else 0)
    return struct.pack("<I", vtype) + struct.pack(SCALAR_FORMATS[vtype], value)


def _encode_kv(key: str, vtype: Any, value: Any) -> bytes:
    if isinstance(vtype, tuple):
        return _string(key) + struct.pack("<I", ARRAY) + _encode_value(vtype, value)
    return _string(key) + _encode_value(vtype, value)


def write_gguf(path: str | Path, metadata: dict[str, Any], tensors: Iterable[TensorEntry],
               value_types: dict[str, Any] | None = None, alignment: int = DEFAULT_ALIGNMENT,
               progress: bool = False) -> None:
    """Write a GGUF v3 file, streaming tensor data.

    Args:
      path: output file (written to `<path>.partial`, then renamed).
      metadata: key -> plain value; types from `value_types`, else `value_type(key, value)`.
      tensors: TensorEntry list; data is produced in this order.
      value_types: optional key -> GGUF type (as `GGUFFile.value_types`) to force exact types.
      alignment: data alignment (written as general.alignment when not 32).
      progress: show a tqdm bar on stderr.
    """
    path = Path(path)
    tensors = list(tensors)
    value_types = value_types or {}
    metadata = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT:
        metadata["general.alignment"] = alignment
    kv = b"".join(_encode_kv(k, value_types.get(k) or value_type(k, v), v)
                  for k, v in metadata.items())
    infos, offset = [], 0
    for t in tensors:
        ne = tuple(reversed(t.shape))
        infos.append(_string(t.name) + struct.pack("<I", len(ne))
                     + struct.pack(f"<{len(ne)}Q", *ne)
                     + struct.pack("<IQ", TYPE_IDS[t.type_name], offset))
        offset += -(-t.nbytes // alignment) * alignment
    header = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + kv
    header += b"".join(infos)
    header += b"\0" * (-len(header) % alignment)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=offset, unit="B", unit_scale=True, desc=f"writing {path.name}",
                   file=sys.stderr, leave=False)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for t in tensors:
                data = t.produce()
                chunks = [data] if isinstance(data, np.ndarray) else data
                written = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk)
                    f.write(memoryview(chunk.reshape(-1).view(np.uint8)))
                    written += chunk.nbytes
                if written != t.nbytes:
                    raise GGUFError(f"internal error: tensor {t.name!r} produced {written} "
                                    f"bytes, expected {t.nbytes}.")
                f.write(b"\0" * (-t.nbytes % alignment))
                if bar is not None:
                    bar.update(t.nbytes)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------------
# Encodings of one linear weight


def ternary_entry(name: str, codes_fn: Callable[[], tuple[np.ndarray, float]], o: int, i: int,
                  qtype: str) -> TensorEntry:
    """A TensorEntry for a ternary weight given lazily as (codes uint8 [O, I], σ).

    Rows not a multiple of the type's block fall back to F16 t·σ (with a warning).
    """
    multiple = _ROW_MULTIPLE.get(qtype)
    if multiple is not None and i % multiple:
        warnings.warn(f"{name}: rows of {i} values are not a multiple of {multiple}, so it is "
                      f"written as F16 instead of {qtype.upper()}.", stacklevel=2)
        qtype = "f16"
    if qtype == "tq2_0":
        return TensorEntry(name, "TQ2_0", (o, i), o * i // quants.QK * quants.TQ2_0_BYTES,
                           lambda: quants.encode_tq2_0(*codes_fn()))
    if qtype == "tq1_0":
        return TensorEntry(name, "TQ1_0", (o, i), o * i // quants.QK * quants.TQ1_0_BYTES,
                           lambda: quants.encode_tq1_0(*codes_fn()))
    if qtype == "i2_s":
        return TensorEntry(name, "I2_S", (o, i), o * i // 4 + 32,
                           lambda: quants.encode_i2s(*codes_fn()))
    dtype, tname = (np.float16, "F16") if qtype == "f16" else (np.float32, "F32")

    def produce():
        codes, sigma = codes_fn()
        return (codes_to_float(codes, sigma)).astype(dtype)

    return TensorEntry(name, tname, (o, i), o * i * np.dtype(dtype).itemsize, produce)


def codes_to_float(codes: np.ndarray, sigma: float) -> np.ndarray:
    """t·σ in float32 from codes [O, I]."""
    return quants.codes_to_ternary(codes).astype(np.float32) * np.float32(sigma)


def float_entry(name: str, fn: Callable[[], np.ndarray], shape: tuple[int, ...],
                type_name: str) -> TensorEntry:
    dtype = {"F16": np.float16, "F32": np.float32}[type_name]
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return TensorEntry(name, type_name, tuple(shape), size,
                       lambda: np.asarray(fn(), np.float32).astype(dtype))


# ------------------------------------------------------------------------------------------------
# A Model -> GGUF


def _layer_codes(leaf, layer: int, perm: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(codes [O, I], σ) of one layer of a BitLinear leaf (packed, or latent -> absmean)."""
    if is_packed(leaf):
        codes = quants.unpack_codes(np.asarray(leaf["packed"][layer]))
        if (codes == 3).any():
            codes = np.where(codes == 3, np.uint8(1), codes)  # llama.cpp maps code 3 to 0
        sigma = float(np.asarray(leaf["scale"][layer], np.float32))
    else:
        t, gamma = ternarize_np(np.asarray(leaf[layer], np.float32))
        codes, sigma = (t + 1).astype(np.uint8), float(gamma)
    return (codes[perm] if perm is not None else codes), sigma


def model_tensors(cfg, params: dict, arch: str, qtype: str) -> list[TensorEntry]:
    """TensorEntries for a whole model under `arch` (linear weights encoded as `qtype`)."""
    float_type = "F32" if qtype == "f32" else "F16"
    # Host numpy views once (zero-copy on CPU): indexing jax arrays per tensor would dispatch
    # (and compile) a slice op for every layer.
    params = jax.tree.map(np.asarray, params)
    layers = params["layers"]
    entries = [float_entry("token_embd.weight", lambda: params["embed_tokens"],
                           (cfg.vocab_size, cfg.hidden_size), float_type)]
    shapes = linear_shapes(cfg)
    widths = {"input_layernorm": cfg.hidden_size, "post_attention_layernorm": cfg.hidden_size,
              "attn_sub_norm": cfg.hidden_size, "ffn_sub_norm": cfg.intermediate_size}
    perms = {}
    if arch == "llama":
        perms[("self_attn", "q_proj")] = llama_permutation(
            shapes[("self_attn", "q_proj")][0], cfg.num_attention_heads)
        perms[("self_attn", "k_proj")] = llama_permutation(
            shapes[("self_attn", "k_proj")][0], cfg.num_key_value_heads)
    order = [(None, "input_layernorm"), ("self_attn", "q_proj"), ("self_attn", "k_proj"),
             ("self_attn", "v_proj"), ("self_attn", "o_proj"), ("self_attn", "attn_sub_norm"),
             (None, "post_attention_layernorm"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
             ("mlp", "down_proj"), ("mlp", "ffn_sub_norm")]
    for layer in range(cfg.num_hidden_layers):
        for mod, name in order:
            if (mod, name) in SUB_NORMS and not cfg.use_sub_norms:
                continue
            leaf = layers[name] if mod is None else layers[mod][name]
            if (mod, name) in NORM_NAMES:
                entries.append(float_entry(
                    block_tensor(layer, NORM_NAMES[(mod, name)]),
                    lambda leaf=leaf, layer=layer: leaf[layer], (widths[name],), "F32"))
                continue
            o, i = shapes[(mod, name)]
            gname = block_tensor(layer, LINEAR_NAMES[(mod, name)])
            perm = perms.get((mod, name))
            if cfg.quantized:
                entries.append(ternary_entry(
                    gname, lambda leaf=leaf, layer=layer, perm=perm: _layer_codes(
                        leaf, layer, perm), o, i, qtype))
            else:
                entries.append(float_entry(
                    gname, lambda leaf=leaf, layer=layer, perm=perm: (
                        np.asarray(leaf[layer], np.float32)[perm] if perm is not None
                        else leaf[layer]), (o, i), float_type))
    entries.append(float_entry("output_norm.weight", lambda: params["norm"],
                               (cfg.hidden_size,), "F32"))
    if not cfg.tie_word_embeddings:
        entries.append(float_entry("output.weight", lambda: params["lm_head"],
                                   (cfg.vocab_size, cfg.hidden_size), float_type))
    return entries


def model_metadata(cfg, arch: str, qtype: str, name: str, tokenizer=None) -> dict[str, Any]:
    """All metadata for a converted model: config keys, file type, tokenizer."""
    meta = metadata_for_config(cfg, arch, name)
    meta["general.file_type"] = FILE_TYPES[qtype]
    if qtype not in ("f16", "f32"):
        meta["general.quantization_version"] = 2
    if tokenizer is not None:
        meta.update(to_gguf_metadata(tokenizer))
    k = "tokenizer.ggml."
    eos = cfg.eos_ids
    for key, value in ((k + "bos_token_id", cfg.bos_token_id),
                       (k + "eos_token_id", eos[0] if eos else None),
                       (k + "eot_token_id", eos[1] if len(eos) > 1 else None),
                       (k + "padding_token_id", cfg.pad_token_id)):
        if value is not None and key not in meta:
            meta[key] = int(value)
    return meta


def write_model_gguf(model, path: str | Path, qtype: str = "tq2_0", name: str | None = None,
                     progress: bool = False) -> str:
    """Write a loaded Model (packed or latent leaves) as a GGUF file.

    Args:
      model: bitnet_jax.formats.loader.Model.
      path: output .gguf path.
      qtype: one of QTYPES (encoding of the linear weights).
      name: general.name (default: the output file's stem).

    Returns:
      The architecture string written.
    """
    if qtype not in QTYPES:
        raise GGUFError(f"unknown GGUF type {qtype!r}; use one of {', '.join(QTYPES)}.")
    cfg = model.config
    if not cfg.quantized and qtype not in ("f16", "f32"):
        raise GGUFError(f"{model.source or 'this model'} is a float Llama (no BitNet "
                        f"quantization), so it cannot be written as {qtype}; use --type f16 "
                        "or f32.")
    arch = gguf_arch_for(cfg)
    if arch != "llama" and not cfg.tie_word_embeddings:
        warnings.warn(f"this model has an untied lm_head; llama.cpp's `{arch}` graph reads no "
                      "`output` tensor, so only bitnet_jax and bitnet.cpp will use it.",
                      stacklevel=2)
    name = name or Path(path).stem
    meta = model_metadata(cfg, arch, qtype, name, model.tokenizer)
    write_gguf(path, meta, model_tensors(cfg, model.params, arch, qtype), progress=progress)
    return arch
