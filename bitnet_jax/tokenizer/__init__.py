"""Tokenizers for BitNet models: SentencePiece (Llama-2 / 1bitLLM), llama3 byte-level BPE
(BitNet-2B4T, Llama3-8B-1.58, Falcon3) and any GGUF `tokenizer.ggml.*` vocabulary (spec §3).

  load_tokenizer(path) -> Tokenizer     GGUF, tokenizer.model, tokenizer.json, vocab.json, HF folder
  Tokenizer.from_gguf_metadata(meta)    from GGUF keys as plain Python values
  Tokenizer.to_gguf_metadata()          the reverse, for the GGUF writer
  IncrementalDecoder(tokenizer)         streaming decode that never splits a UTF-8 character
  tokenize_main(argv)                   the `bitnet-jax tokenize` command

Files: `_core.py` (Tokenizer, IncrementalDecoder), `_decode.py` (byte tables, sentencepiece's
decode rules), `_backends.py` (vocabulary -> sentencepiece / tokenizers), `_pretok.py` (llama.cpp
pre-tokenizer regexes), `_gguf.py` (GGUF metadata <-> Tokenizer), `_files.py` (tokenizer files),
`_load.py` (paths), `_chat.py` (chat templates), `cli.py` (`bitnet-jax tokenize`).
"""

from bitnet_jax.tokenizer._core import IncrementalDecoder, Tokenizer
from bitnet_jax.tokenizer._load import load_tokenizer, read_gguf_tokenizer_metadata
from bitnet_jax.cli.tokenize import tokenize_main

__all__ = [
    "IncrementalDecoder",
    "Tokenizer",
    "load_tokenizer",
    "read_gguf_tokenizer_metadata",
    "tokenize_main",
]
