"""Tokenizers for BitNet models: SentencePiece (Llama-2 / 1bitLLM), llama3 byte-level BPE
(BitNet-2B4T, Llama3-8B-1.58, Falcon3) and any GGUF `tokenizer.ggml.*` vocabulary (spec §3).

  Tokenizer                             encode / decode / apply_chat_template / special ids
  IncrementalDecoder(tokenizer)         the streaming detokenizer: push(id) -> new text, never
                                        half a UTF-8 character; flush() -> the rest
  from_gguf_metadata(meta) -> Tokenizer from GGUF `tokenizer.*` keys as plain Python values
  to_gguf_metadata(tok) -> dict         the reverse, for the GGUF writer
  load_tokenizer_files(path)            tokenizer.model, tokenizer.json, vocab.json, HF folder
  TOKENIZER_FILES                       the file names that make a folder a tokenizer folder

To load a tokenizer from any path, GGUF files included, use `bitnet_jax.load_tokenizer(path)`
(bitnet_jax/formats/tokenizer.py): reading GGUF belongs to `bitnet_jax.formats`, which imports
this package, never the reverse. The `bitnet-jax tokenize` command is bitnet_jax/cli/tokenize.py.

Files, each importing only those listed before it:
  `_pretok.py` (llama.cpp pre-tokenizer regexes, GPT-2 byte map), `_decode.py` (byte tables,
  sentencepiece's decode rules, the UTF-8 check), `_chat.py` (chat templates; takes the
  tokenizer as an argument), `_core.py` (Tokenizer, IncrementalDecoder), `_backends.py`
  (vocabulary -> sentencepiece / tokenizers), `_files.py` (tokenizer files), `_gguf.py` (GGUF
  metadata <-> Tokenizer), `_load.py` (paths).
"""

from bitnet_jax.tokenizer._core import IncrementalDecoder, Tokenizer
from bitnet_jax.tokenizer._gguf import from_gguf_metadata, to_gguf_metadata
from bitnet_jax.tokenizer._load import TOKENIZER_FILES, load_tokenizer_files

__all__ = [
    "TOKENIZER_FILES",
    "IncrementalDecoder",
    "Tokenizer",
    "from_gguf_metadata",
    "load_tokenizer_files",
    "to_gguf_metadata",
]
