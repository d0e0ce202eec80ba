"""bitnet_jax: BitNet b1.58 language models as pure JAX functions.

Public API (everything else is an implementation detail):
  load_model(path) -> Model          HF directory, GGUF file or llama2.c .bin
  forward(params, tokens, config)    [B, T] int32 -> [B, T, V] float32 logits
  load_tokenizer(path) -> Tokenizer
  generate(model, prompts, ...) / stream(model, prompt, ...) / warmup(model, ...)
  Engine(model, slots=...)           the continuous-batching engine behind them and the server
  shard(model, mesh) -> Model        params split over a ("data", "tensor") jax mesh
  ModelConfig, Policy, SamplingParams, BitNetError, DEFAULT_MODEL (the bundled model)

The names are imported on first use (PEP 562), so `import bitnet_jax` does not import JAX: the
`bitnet-jax` command installs its Ctrl-C handling before anything heavy loads, and
`bitnet-jax --version` answers at once. Each name lives in exactly one module, listed here.
"""

from __future__ import annotations

from bitnet_jax._lazy import lazy_exports

_EXPORTS = {
    "__version__": "bitnet_jax._version",
    "BitNetError": "bitnet_jax.errors",
    "DEFAULT_MODEL": "bitnet_jax.formats.base",
    "Model": "bitnet_jax.formats.base",
    "load_model": "bitnet_jax.formats.loader",
    "ModelConfig": "bitnet_jax.model.config",
    "from_hf": "bitnet_jax.model.config",
    "load_config": "bitnet_jax.model.config",
    "POLICIES": "bitnet_jax.model.policy",
    "Policy": "bitnet_jax.model.policy",
    "get_policy": "bitnet_jax.model.policy",
    "init_params": "bitnet_jax.model.params",
    "pack_params": "bitnet_jax.model.params",
    "apply": "bitnet_jax.model.transformer",
    "forward": "bitnet_jax.model.transformer",
    "unembed": "bitnet_jax.model.transformer",
    "Result": "bitnet_jax.runtime.generate",
    "generate": "bitnet_jax.runtime.generate",
    "stream": "bitnet_jax.runtime.generate",
    "warmup": "bitnet_jax.runtime.generate",
    "SamplingParams": "bitnet_jax.runtime.sampling",
    "Engine": "bitnet_jax.runtime.scheduler",
    "shard": "bitnet_jax.model.sharding",
    "Tokenizer": "bitnet_jax.tokenizer",
    "load_tokenizer": "bitnet_jax.formats.tokenizer",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
