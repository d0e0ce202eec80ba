"""GGUF support: a strict reader, ternary tensor codecs, the loader, a streaming writer.

  load_gguf(path, policy, packed, tokenizer) -> Model   (used by bitnet_jax.load_model)
  read_gguf(path) -> GGUFFile                           header + lazy tensor data
  write_model_gguf(model, path, qtype)                  Model -> .gguf
  write_gguf(path, metadata, tensors)                   the container writer
  convert_main(argv) / inspect_main(argv)               `bitnet-jax convert` / `inspect`

Modules: reader.py (container), quants.py (TQ1_0/TQ2_0/I2_S/float codecs), arch.py
(architectures, config, tensor names, Q/K permutation), load.py, write.py, describe.py
(`inspect`; not called inspect.py, which would shadow the stdlib module in this folder).
"""

from bitnet_jax.formats.gguf.describe import describe, inspect_main
from bitnet_jax.formats.gguf.load import load_gguf, tokenizer_from_metadata
from bitnet_jax.formats.gguf.reader import GGUFFile, TensorInfo, read_gguf
from bitnet_jax.formats.gguf.write import (
    QTYPES, TensorEntry, convert_main, write_gguf, write_model_gguf)

__all__ = [
    "GGUFFile",
    "QTYPES",
    "TensorEntry",
    "TensorInfo",
    "convert_main",
    "describe",
    "inspect_main",
    "load_gguf",
    "read_gguf",
    "tokenizer_from_metadata",
    "write_gguf",
    "write_model_gguf",
]
