"""bitnet_jax: BitNet b1.58 language models as pure JAX functions.

Public API (everything else is an implementation detail):
  load_model(path) -> Model          HF directory or GGUF file
  forward(params, tokens, config)    [B, T] int32 -> [B, T, V] float32 logits
  load_tokenizer(path) -> Tokenizer
  generate(model, prompts, ...) / stream(model, prompt, ...)
  ModelConfig, Policy, BitNetError
"""

from bitnet_jax.config import ModelConfig, from_hf, load_config
from bitnet_jax.errors import BitNetError
from bitnet_jax.generate import Result, SamplingParams, generate, stream, warmup
from bitnet_jax.loading import Model, load_model
from bitnet_jax.model import apply, forward, unembed
from bitnet_jax.params import init_params, pack_params
from bitnet_jax.policy import POLICIES, Policy, get_policy
from bitnet_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BitNetError",
    "Model",
    "ModelConfig",
    "POLICIES",
    "Policy",
    "Result",
    "SamplingParams",
    "Tokenizer",
    "apply",
    "forward",
    "from_hf",
    "generate",
    "get_policy",
    "init_params",
    "load_config",
    "load_model",
    "load_tokenizer",
    "pack_params",
    "stream",
    "unembed",
    "warmup",
]
