"""GGUF support: a strict reader, ternary tensor codecs, the loader, a streaming writer.

  load_gguf(path, policy, packed, tokenizer) -> Model   (used by bitnet_jax.load_model)
  read_gguf(path) -> GGUFFile                           header + lazy tensor data
  write_model_gguf(model, path, qtype)                  Model -> .gguf
  write_gguf(path, metadata, tensors)                   the container writer

Modules: reader.py (container), quants.py (TQ1_0/TQ2_0/I2_S/float codecs), arch.py
(architectures, config, tensor names, Q/K permutation), load.py, write.py, describe.py (the
report of `bitnet-jax inspect`). The `convert` and `inspect` commands live in bitnet_jax/cli/.
"""

from bitnet_jax.formats.gguf.describe import describe
from bitnet_jax.formats.gguf.load import load_gguf, tokenizer_from_metadata
from bitnet_jax.formats.gguf.reader import GGUFFile, TensorInfo, read_gguf
from bitnet_jax.formats.gguf.write import (
    QTYPES, TensorEntry, write_gguf, write_model_gguf)

__all__ = [
    "GGUFFile",
    "QTYPES",
    "TensorEntry",
    "TensorInfo",
    "describe",
    "load_gguf",
    "read_gguf",
    "tokenizer_from_metadata",
    "write_gguf",
    "write_model_gguf",
]
