"""llama2.c checkpoints (karpathy's `run.c` legacy "v0" format) -> float Llama params.

Layout (shared/data README §3; llama2.c `export.py` legacy_export): a header of 7 int32
(dim D, hidden_dim F, n_layers L, n_heads N, n_kv_heads K, vocab_size V, seq_len), then float32
arrays in this order:

  tok_emb [V, D], rms_att [L, D], wq [L, N·H, D], wk [L, K·H, D], wv [L, K·H, D],
  wo [L, D, N·H], rms_ffn [L, D], w1 [L, F, D], w2 [L, D, F], w3 [L, F, D], rms_final [D],
  freq_cis_real [seq_len, H/2], freq_cis_imag [seq_len, H/2], then wcls [V, D] when V < 0

A negative vocab_size means the classifier is *not* shared with the embedding (|V| is the size).
w1 is the gate, w3 the up and w2 the down projection of the SwiGLU FFN.

RoPE: llama2.c rotates interleaved pairs (2i, 2i+1) of each head; bitnet_jax (like Hugging Face)
rotates halves (i, i + H/2). As in HF's `convert_llama_weights_to_hf.py`, the rows of wq and wk
are permuted within each head so that the rotate-half model computes the same function:
new row j of a head takes old row 2j for j < H/2 and old row 2(j - H/2) + 1 otherwise.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.config import ModelConfig
from bitnet_jax.errors import CheckpointError

_HEADER = 7
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's versioned exports, which we do not read


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k projection rows from interleaved-pair RoPE order to rotate-half order.

    Args:
      w: [N·H, D] projection weight (or [L, N·H, D] stacked by layer).
      n_heads: N, the number of heads the rows are split into.

    Returns:
      The same weight with the rows of every head reordered (pairs (2i, 2i+1) -> (i, i + H/2)).
    """
    *lead, rows, cols = w.shape
    h = rows // n_heads
    w = w.reshape(*lead, n_heads, h // 2, 2, cols)
    return np.swapaxes(w, -3, -2).reshape(*lead, rows, cols)


def is_llama2c(bin_path: str | Path) -> bool:
    """True if the file is a llama2.c v0 checkpoint: its header implies exactly its size."""
    path = Path(bin_path)
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=_HEADER)
    except OSError:
        return False
    if len(header) < _HEADER:
        return False
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(v) for v in header)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len) <= 0 or dim % n_heads:
        return False
    return size == 4 * (_HEADER + _n_floats(*(int(v) for v in header)))


def _n_floats(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) -> int:
    """Number of float32 values after the header (layout in the module docstring)."""
    hd = dim // n_heads
    kv = n_kv_heads * hd
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim
    return (abs(vocab) * dim * (1 if vocab > 0 else 2) + n_layers * per_layer + dim
            + seq_len * hd)


def read_llama2c(bin_path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a llama2.c v0 checkpoint into (config, dict of float32 numpy arrays by llama2.c name).

    The q/k rows are returned as stored (interleaved RoPE order).
    """
    path = Path(bin_path)
    if not path.is_file():
        raise CheckpointError(f"llama2.c checkpoint {path} does not exist or is not a file.")
    size = path.stat().st_size
    if size < 4 * _HEADER:
        raise CheckpointError(f"{path} is too short to be a llama2.c checkpoint.")
    header = np.fromfile(path, dtype="<i4", count=_HEADER)
    if int(header[0]) & 0xFFFFFFFF == _MAGIC_V1:
        raise CheckpointError(
            f"{path} is a versioned llama2.c export (magic 'ak42'); only the legacy v0 format is "
            "supported: re-export it with llama2.c's `export.py --version 0`."
        )
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(v) for v in header)
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads:
        raise CheckpointError(f"{path} has an invalid llama2.c header {header.tolist()}.")
    hd = dim // n_heads
    kv = n_kv_heads * hd
    shapes = [
        ("tok_emb", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)), ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)), ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, hd // 2)), ("freq_cis_imag", (seq_len, hd // 2)),
    ]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    n_floats = sum(int(np.prod(s)) for _, s in shapes)
    assert n_floats == _n_floats(*(int(v) for v in header))
    if size != 4 * (_HEADER + n_floats):
        raise CheckpointError(
            f"{path} holds {size} bytes but its header {header.tolist()} implies "
            f"{4 * (_HEADER + n_floats)}; the file is truncated or not a llama2.c v0 checkpoint."
        )
    data = np.memmap(path, dtype="<f4", mode="r", offset=4 * _HEADER, shape=(n_floats,))
    arrays, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        arrays[name] = np.asarray(data[offset: offset + n]).reshape(shape)
        offset += n
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=hd,
        max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        hidden_act="silu", tie_word_embeddings=shared, bos_token_id=1, eos_token_id=2,
        model_type="llama", architecture="LlamaForCausalLM", use_sub_norms=False,
        quant_method=None,
    )
    return cfg, arrays


def load_llama2c(bin_path: str | Path, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """Load a llama2.c v0 checkpoint as a float Llama (no quantisation).

    Args:
      bin_path: path of the `.bin` file written by llama2.c's legacy export.
      dtype: dtype of the returned parameter leaves.

    Returns:
      (config, params) in the model.py layout (per-layer leaves stacked on L), q/k rows permuted
      to rotate-half order so `bitnet_jax.forward` reproduces llama2.c's `run.c`.
    """
    cfg, a = read_llama2c(bin_path)

    def leaf(x):
        return jnp.asarray(np.ascontiguousarray(x), dtype)

    params = {
        "embed_tokens": leaf(a["tok_emb"]),
        "layers": {
            "input_layernorm": leaf(a["rms_att"]),
            "post_attention_layernorm": leaf(a["rms_ffn"]),
            "self_attn": {
                "q_proj": leaf(interleaved_to_half(a["wq"], cfg.num_attention_heads)),
                "k_proj": leaf(interleaved_to_half(a["wk"], cfg.num_key_value_heads)),
                "v_proj": leaf(a["wv"]),
                "o_proj": leaf(a["wo"]),
            },
            "mlp": {
                "gate_proj": leaf(a["w1"]),
                "up_proj": leaf(a["w3"]),
                "down_proj": leaf(a["w2"]),
            },
        },
        "norm": leaf(a["rms_final"]),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = leaf(a["wcls"])
    return cfg, params
