"""Precision policies: which dtype parameters, activations and outputs use.

A `Policy` mirrors jmp's three-dtype API. Norm statistics, softmax, quantisation scales and
logits always run in float32 whatever the policy says (spec §1.1; MaxText `cast_logits_to_fp32`).
float16 is refused for parameters, activations and outputs: BitNet-2B4T's relu² overflows
its range.

`kernel` picks the ternary matmul implementation: "auto" (FFI on CPU when built, Pallas on
GPU, XLA otherwise), "xla", "ffi" or "pallas". It is resolved at trace time.

`kv_cache_dtype` is the KV cache's dtype: None (the default) keeps it in the compute dtype;
"float16" or "bfloat16" halve a float32 cache's memory and the bytes each decode step reads
(the CPU attention kernel widens the values to float32; the CLI uses float16 on CPU, as
llama.cpp does). float16 is fine here: cached keys/values are projections, not relu² outputs.
"int8" stores each cached row as int8 codes with its own float32 scale (model/cache.py): half
a float16 cache's bytes and memory, at a small change in numerics (like llama.cpp's
`-ctk q8_0 -ctv q8_0`); opt-in, never chosen for you. The CPU kernel and the XLA path read it;
the Pallas GPU kernels do not (an int8 cache runs XLA's attention there).

`lm_head` is "float" (exact, the default), "int8" or "auto": with int8 the loaders and the engine
keep an int8 per-row copy of the LM head (and of the embedding, when tied), which halves or
quarters the bytes a decode step reads. params.lm_head_format is the one rule that decides
(auto = int8 on CPU, as the CLI does; float Llama models always keep a float head).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bitnet_jax.errors import ConfigError

_KERNELS = ("auto", "xla", "ffi", "pallas")
_LM_HEADS = ("float", "int8", "auto")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Dtypes for one run. Frozen and hashable, so it can be a static jit argument.

    Attributes:
      param_dtype: dtype float parameters (embeddings, norms, latent weights) are stored in; a
        packed model keeps a float16 / bfloat16 embedding or LM head table as the file stores
        it under float32 (params.table_dtype: widening is exact).
      compute_dtype: dtype of activations between layers and of the KV cache.
      output_dtype: dtype of the logits.
      kernel: ternary matmul implementation ("auto", "xla", "ffi", "pallas").
      lm_head: "float", "int8" or "auto" (params.lm_head_format decides).
      kv_cache_dtype: None (compute dtype), "float32", "float16", "bfloat16" or "int8".
    """

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    output_dtype: str = "float32"
    kernel: str = "auto"
    lm_head: str = "float"
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        for field in ("param_dtype", "compute_dtype", "output_dtype"):
            name = jnp.dtype(getattr(self, field)).name
            if name not in ("float32", "bfloat16"):
                raise ConfigError(
                    f"Policy.{field}={name} is not supported; use float32 or bfloat16 "
                    "(float16 overflows in relu² FFNs)."
                )
            object.__setattr__(self, field, name)
        if self.kernel not in _KERNELS:
            raise ConfigError(f"Policy.kernel={self.kernel!r} is unknown; use one of {_KERNELS}.")
        if self.kv_cache_dtype is not None:
            name = jnp.dtype(self.kv_cache_dtype).name
            if name not in ("float32", "float16", "bfloat16", "int8"):
                raise ConfigError(f"Policy.kv_cache_dtype={name} is not supported; use float32, "
                                  "float16, bfloat16 or int8.")
            object.__setattr__(self, "kv_cache_dtype", name)
        if self.lm_head not in _LM_HEADS:
            raise ConfigError(f"Policy.lm_head={self.lm_head!r} is unknown; use one of {_LM_HEADS}.")

    @property
    def param(self):
        return jnp.dtype(self.param_dtype)

    @property
    def compute(self):
        return jnp.dtype(self.compute_dtype)

    @property
    def kv_cache(self):
        """The KV cache dtype (the compute dtype unless kv_cache_dtype says otherwise)."""
        return jnp.dtype(self.kv_cache_dtype or self.compute_dtype)

    @property
    def output(self):
        return jnp.dtype(self.output_dtype)

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)


POLICIES = {
    # XLA:CPU bf16 dots are no faster than f32 and pathological at M=1 (jax-notes §2.3).
    "cpu": Policy("float32", "float32", "float32"),
    "gpu": Policy("bfloat16", "bfloat16", "float32"),
    "train": Policy("float32", "bfloat16", "float32"),
}


def get_policy(policy: Policy | str | None) -> Policy:
    """Return a Policy from a preset name ("cpu", "gpu", "train"), a Policy, or None (cpu)."""
    if policy is None:
        return POLICIES["cpu"]
    if isinstance(policy, Policy):
        return policy
    if policy not in POLICIES:
        raise ConfigError(f"Unknown precision policy {policy!r}; use one of {sorted(POLICIES)}.")
    return POLICIES[policy]
