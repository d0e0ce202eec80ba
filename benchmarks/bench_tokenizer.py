"""Encode throughput of bitnet_jax.tokenizer against the raw library it wraps.

For each tokenizer kind (sentencepiece Llama-2, `tokenizers` byte-level BPE, tiktoken llama3) the
whole corpus (~1 MB of English, tinyshakespeare) is encoded in one call, by the raw library and
by `Tokenizer.encode`, alternating and keeping the best of --repeats runs. One JSON line per kind:
tokens/s for both and the ratio wrapped/raw (1.0 = no wrapping cost; the target is > 0.8).

Usage:
  python benchmarks/bench_tokenizer.py [--data ../shared/data] [--repeats 5] [--gguf]

--gguf adds the llama3 vocabulary built from ggml-vocab-llama-bpe.gguf (slow to read with gguf's
reader). The machine, Python and library versions are printed first.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_jax.formats.tokenizer import load_tokenizer  # noqa: E402


def _time(fn, text: str) -> tuple[float, int]:
    """(seconds, number of tokens) of one encode call."""
    t0 = time.perf_counter()
    n = len(fn(text))
    return time.perf_counter() - t0, n


def _raw_encoder(tok):
    """The underlying library call that `Tokenizer.encode(text)` stands for."""
    backend = tok._backend
    if tok.kind == "spm":
        return backend.encode
    if tok.kind == "tiktoken":
        return backend.encode_ordinary
    return lambda text: backend.encode(text, add_special_tokens=False).ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gguf", action="store_true",
                        help="also time the llama-bpe GGUF vocabulary")
    args = parser.parse_args(argv)
    data = Path(args.data)
    text = (data / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    import sentencepiece
    import tiktoken
    import tokenizers

    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
        "sentencepiece": sentencepiece.__version__, "tokenizers": tokenizers.__version__,
        "tiktoken": tiktoken.__version__, "text_bytes": len(text.encode()),
    }))
    kinds = [
        ("spm llama2", data / "tokenizers" / "llama2-spm" / "tokenizer.model"),
        ("bpe gpt2 (tokenizers)", data / "tokenizers" / "gpt2" / "vocab.json"),
        ("tiktoken llama3", data / "tokenizers" / "llama3-tiktoken" / "tokenizer.model"),
    ]
    if args.gguf:
        gguf = data / "llama-vocab" / "ggml-vocab-llama-bpe.gguf"
        kinds.append(("bpe llama3 gguf (tokenizers)", gguf))
    for name, path in kinds:
        tok = load_tokenizer(path)
        raw = _raw_encoder(tok)
        assert raw(text) == tok.encode(text), f"{name}: wrapper and library disagree"
        raw_s, wrapped_s = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternate so load changes hit both sides alike
            t, n = _time(raw, text)
            raw_s = min(raw_s, t)
            t, n = _time(tok.encode, text)
            wrapped_s = min(wrapped_s, t)
        print(json.dumps({"kind": name, "tokens": n, "raw_tok_per_s": round(n / raw_s),
                          "wrapped_tok_per_s": round(n / wrapped_s),
                          "ratio": round(raw_s / wrapped_s, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
