"""Model files in and out: one `load_model` for every format, and the readers and writers.

  base.py         the Model type every loader returns, DEFAULT_MODEL (the bundled model)
  loader.py       load_model(path): picks the format by content
  hf.py           Hugging Face folders (config.json + safetensors), load and save
  safetensors.py  the safetensors container (mmap reader, writer)
  gguf/           GGUF files: reader, ternary codecs, loader, writer, describe
  llama2c.py      karpathy/llama2.c .bin exports (stories260K)
  tokenizer.py    load_tokenizer(path) for every file a model ships, GGUF included
"""

from bitnet_jax.formats.base import DEFAULT_MODEL, Model
from bitnet_jax.formats.loader import load_model

__all__ = ["DEFAULT_MODEL", "Model", "load_model"]
