"""bitnet_jax: BitNet b1.58 language models as pure JAX functions.

Public API (everything else is an implementation detail):
  load_model(path) -> Model          HF directory, GGUF file or llama2.c .bin
  forward(params, tokens, config)    [B, T] int32 -> [B, T, V] float32 logits
  load_tokenizer(path) -> Tokenizer
  generate(model, prompts, ...) / stream(model, prompt, ...) / warmup(model, ...)
  ModelConfig, Policy, SamplingParams, BitNetError, DEFAULT_MODEL (the bundled model)

The names are imported on first use (PEP 562), so `import bitnet_jax` does not import JAX: the
`bitnet-jax` command installs its Ctrl-C handling before anything heavy loads, and
`bitnet-jax --version` answers at once. Each name lives in exactly one module, listed here.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
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
    "Tokenizer": "bitnet_jax.tokenizer",
    "load_tokenizer": "bitnet_jax.formats.tokenizer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _version() -> str:
    # Deferred: importlib.metadata costs ~25 ms, most of `bitnet-jax`'s start before Ctrl-C works.
    import importlib.metadata

    try:
        return importlib.metadata.version("bitnet-jax")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str):
    if name == "__version__":
        globals()[name] = _version()
        return globals()[name]
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bitnet_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | {"__version__"})
