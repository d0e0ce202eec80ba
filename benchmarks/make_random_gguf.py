"""Write a random-ternary-weight BitNet GGUF for benchmarks (loading, decoding, llama-bench).

  python benchmarks/make_random_gguf.py OUT.gguf --shape large --type tq2_0
  python benchmarks/make_random_gguf.py OUT.gguf --shape 2b4t --type i2_s [--layers 4]

Shapes (bitnet-spec §1.2, §1.4):
  large  1bitLLM bitnet_b1_58-large: D=1536, L=24, F=4096, 16/16 heads, V=32000, SiLU, arch
         `bitnet` (llama.cpp's graph), Llama-2 SentencePiece vocabulary.
  2b4t   BitNet-b1.58-2B-4T: D=2560, L=30, F=6912, 20/5 heads, V=128256, relu², arch
         `bitnet-b1.58` (bitnet.cpp's graph), llama3 BPE vocabulary.

`--arch bitnet` writes any shape with llama.cpp's `bitnet` graph (SiLU FFN; same tensors and
sizes), which upstream llama.cpp loads: benchmarks/bench_cpu.py uses it for the 2b4t shape, since
upstream llama.cpp does not know bitnet.cpp's `bitnet-b1.58` architecture name.

Linear weights are random codes in {-1, 0, 1} with a per-matrix σ = 1/sqrt(2I/3) (unit-variance
outputs), written TQ2_0 / TQ1_0 / I2_S; token_embd is F16 N(0, 1), norms are F32 ones. The
vocabulary comes from llama.cpp's vocab-only GGUFs in ../shared/data/llama-vocab when present
(else a synthetic SentencePiece vocabulary of the right size). Every tensor is generated just
before it is written, the embedding in row chunks, so memory stays at one tensor's codes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_jax.model.config import ModelConfig  # noqa: E402
from bitnet_jax.formats.gguf.arch import (  # noqa: E402
    LINEAR_NAMES, NORM_NAMES, block_tensor, metadata_for_config)
from bitnet_jax.formats.gguf.reader import read_gguf  # noqa: E402
from bitnet_jax.formats.gguf.write import FILE_TYPES, TensorEntry, ternary_entry, write_gguf  # noqa: E402
from bitnet_jax.model.params import linear_shapes  # noqa: E402

SHAPES = {
    "large": dict(arch="bitnet", vocab="ggml-vocab-llama-spm.gguf", cfg=dict(
        vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
        rope_theta=10000.0, hidden_act="silu", architecture="BitnetForCausalLM",
        bos_token_id=1, eos_token_id=2)),
    "2b4t": dict(arch="bitnet-b1.58", vocab="ggml-vocab-llama-bpe.gguf", cfg=dict(
        vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
        num_attention_heads=20, num_key_value_heads=5, max_position_embeddings=4096,
        rope_theta=500000.0, hidden_act="relu2", architecture="BitNetForCausalLM",
        bos_token_id=128000, eos_token_id=128001)),
}
DEFAULT_VOCAB_DIR = ROOT.parent / "shared" / "data" / "llama-vocab"
_EMBED_ROWS = 4096  # rows of the F16 embedding generated per chunk


def shape_config(shape: str, layers: int | None = None, arch: str | None = None) -> ModelConfig:
    kw = dict(SHAPES[shape]["cfg"])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    if arch == "bitnet":  # llama.cpp's graph: SiLU gate (the 1bitLLM models)
        kw.update(hidden_act="silu", architecture="BitnetForCausalLM")
    return ModelConfig(**kw, tie_word_embeddings=True, use_sub_norms=True, model_type="bitnet",
                       linear_class="autobitlinear")


def synthetic_vocab(n: int, bos: int, eos: int) -> tuple[dict, dict]:
    """A SentencePiece-style vocabulary: unk, 256 byte tokens, pieces, bos/eos at their ids."""
    tokens = [f"\u2581p{i}" for i in range(n)]
    types = [1] * n
    tokens[0], types[0] = "<unk>", 2
    for b in range(256):
        tokens[3 + b], types[3 + b] = f"<0x{b:02X}>", 6
    tokens[bos], types[bos] = "<s>", 3
    tokens[eos], types[eos] = "</s>", 3
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [-float(i) for i in range(n)],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": bos,
            "tokenizer.ggml.eos_token_id": eos, "tokenizer.ggml.unknown_token_id": 0}
    return meta, {}


def vocab_metadata(shape: str, cfg: ModelConfig, vocab_dir: Path) -> tuple[dict, dict]:
    """(tokenizer.* metadata, their GGUF value types) for the shape."""
    path = vocab_dir / SHAPES[shape]["vocab"]
    if not path.exists():
        print(f"note: {path} not found, writing a synthetic vocabulary", file=sys.stderr)
        return synthetic_vocab(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
    g = read_gguf(path)
    meta = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
    if len(meta.get("tokenizer.ggml.tokens", ())) != cfg.vocab_size:
        raise SystemExit(f"{path} has {len(meta['tokenizer.ggml.tokens'])} tokens, the "
                         f"{shape} shape needs {cfg.vocab_size}.")
    meta.setdefault("tokenizer.ggml.bos_token_id", cfg.bos_token_id)
    meta.setdefault("tokenizer.ggml.eos_token_id", cfg.eos_token_id)
    return meta, {k: g.value_types[k] for k in meta if k in g.value_types}


def random_tensors(cfg: ModelConfig, qtype: str, seed: int) -> list[TensorEntry]:
    """TensorEntries generating each tensor on demand (never the whole model at once)."""
    d, v = cfg.hidden_size, cfg.vocab_size

    def embedding():
        rng = np.random.default_rng([seed, 0])
        for r0 in range(0, v, _EMBED_ROWS):
            rows = min(_EMBED_ROWS, v - r0)
            yield rng.standard_normal((rows, d), np.float32).astype(np.float16)

    def codes(layer: int, k: int, o: int, i: int):
        def make():
            rng = np.random.default_rng([seed, 1 + layer, k])
            return rng.integers(0, 3, size=(o, i), dtype=np.uint8), 1.0 / np.sqrt(2 * i / 3)
        return make

    def ones(n):
        return lambda: np.ones(n, np.float32)

    entries = [TensorEntry("token_embd.weight", "F16", (v, d), v * d * 2, embedding)]
    widths = {"input_layernorm": d, "post_attention_layernorm": d, "attn_sub_norm": d,
              "ffn_sub_norm": cfg.intermediate_size}
    shapes = linear_shapes(cfg)
    for layer in range(cfg.num_hidden_layers):
        for (_, name), gname in NORM_NAMES.items():
            n = widths[name]
            entries.append(TensorEntry(block_tensor(layer, gname), "F32", (n,), 4 * n, ones(n)))
        for k, (path, gname) in enumerate(LINEAR_NAMES.items()):
            o, i = shapes[path]
            entries.append(ternary_entry(block_tensor(layer, gname), codes(layer, k, o, i),
                                         o, i, qtype))
    entries.append(TensorEntry("output_norm.weight", "F32", (d,), 4 * d, ones(d)))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output .gguf path")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="large")
    parser.add_argument("--type", dest="qtype", choices=("tq2_0", "tq1_0", "i2_s"),
                        default="tq2_0")
    parser.add_argument("--layers", type=int, help="override the layer count (smaller files)")
    parser.add_argument("--arch", choices=("bitnet", "bitnet-b1.58"),
                        help="GGUF architecture (default: the shape's own; bitnet = llama.cpp's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-dir", type=Path, default=DEFAULT_VOCAB_DIR)
    args = parser.parse_args(argv)
    arch = args.arch or SHAPES[args.shape]["arch"]
    cfg = shape_config(args.shape, args.layers, arch)
    meta = metadata_for_config(cfg, arch, f"random-{args.shape}-{args.qtype}")
    meta["general.file_type"] = FILE_TYPES[args.qtype]
    meta["general.quantization_version"] = 2
    vocab, vocab_types = vocab_metadata(args.shape, cfg, args.vocab_dir)
    meta.update(vocab)
    write_gguf(args.out, meta, random_tensors(cfg, args.qtype, args.seed),
               value_types=vocab_types, progress=sys.stderr.isatty())
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size / 1e6:.1f} MB, {arch}, {cfg.num_hidden_layers} layers, "
          f"{args.qtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
