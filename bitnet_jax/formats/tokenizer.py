"""`load_tokenizer(path)` for every file a model ships (placeholder until the split lands)."""

from bitnet_jax.tokenizer import load_tokenizer

__all__ = ["load_tokenizer"]
